package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"io"
	"os"

	"k8s.io/apiserver/pkg/authentication/token/tokenfile"
)

// tokenFileDecoded is one line of decode-token-file output: what kube-apiserver's own reader
// makes of a --token-auth-file.
type tokenFileDecoded struct {
	File string `json:"file"`
	// Records: the file as encoding/csv reads it with kube-apiserver's settings.
	Records [][]string `json:"records"`
	// Users: per token, who kube-apiserver's authenticator says it is.
	Users map[string]tokenUser `json:"users"`
	// Error: why kube-apiserver would not start with this file (tokenfile.NewCSV's error).
	Error string `json:"error,omitempty"`
}

type tokenUser struct {
	Name   string   `json:"name"`
	UID    string   `json:"uid"`
	Groups []string `json:"groups"`
}

// decodeTokenFiles reads each file with tokenfile.NewCSV, the reader kube-apiserver runs at
// start-up for --token-auth-file, and asks the authenticator about every token in it.
func decodeTokenFiles(files []string) error {
	captureKlog()
	out := json.NewEncoder(os.Stdout)
	for _, file := range files {
		if err := out.Encode(decodeTokenFile(file)); err != nil {
			return err
		}
	}
	return nil
}

func decodeTokenFile(file string) tokenFileDecoded {
	line := tokenFileDecoded{File: file, Records: [][]string{}, Users: map[string]tokenUser{}}
	authenticator, err := tokenfile.NewCSV(file)
	if err != nil {
		line.Error = err.Error()
		return line
	}
	handle, err := os.Open(file)
	if err != nil {
		line.Error = err.Error()
		return line
	}
	defer handle.Close()
	reader := csv.NewReader(handle)
	reader.FieldsPerRecord = -1 // as tokenfile.NewCSV sets it
	for {
		record, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			line.Error = "encoding/csv disagrees with tokenfile: " + err.Error()
			return line
		}
		line.Records = append(line.Records, record)
		if record[0] == "" {
			continue
		}
		response, ok, err := authenticator.AuthenticateToken(context.Background(), record[0])
		if err != nil || !ok {
			continue
		}
		groups := response.User.GetGroups()
		if groups == nil {
			groups = []string{}
		}
		line.Users[record[0]] = tokenUser{response.User.GetName(), response.User.GetUID(), groups}
	}
	return line
}
