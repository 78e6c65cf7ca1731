package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	auditv1 "k8s.io/apiserver/pkg/apis/audit/v1"
	"k8s.io/apiserver/pkg/audit"
	"k8s.io/apiserver/pkg/audit/policy"
	"k8s.io/klog/v2"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"

	kubeletconfig "k8s.io/kubernetes/pkg/kubelet/config"
)

// decoded is one line of decode-pod / decode-audit-policy output.
type decoded struct {
	File   string      `json:"file"`
	Pod    *v1.Pod     `json:"pod,omitempty"`
	Policy interface{} `json:"policy,omitempty"`
	Error  string      `json:"error,omitempty"`
}

// klogBuffer catches what kubelet's file source logs, the only place it says why it refused a file.
var klogBuffer bytes.Buffer

func captureKlog() {
	flags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(flags)
	for name, value := range map[string]string{"logtostderr": "false", "stderrthreshold": "FATAL", "one_output": "true"} {
		_ = flags.Set(name, value)
	}
	klog.SetOutput(&klogBuffer)
}

// decodePods runs kubelet's own static pod file source on each file, one folder each.
func decodePods(files []string) error {
	captureKlog()
	out := json.NewEncoder(os.Stdout)
	for _, file := range files {
		if err := out.Encode(decodePod(file)); err != nil {
			return err
		}
	}
	return nil
}

func decodePod(file string) decoded {
	data, err := os.ReadFile(file)
	if err != nil {
		return decoded{File: file, Error: err.Error()}
	}
	dir, err := os.MkdirTemp("", "decode-pod-")
	if err != nil {
		return decoded{File: file, Error: err.Error()}
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "pod.yaml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return decoded{File: file, Error: err.Error()}
	}
	klogBuffer.Reset()
	updates := make(chan interface{}, 4)
	go kubeletconfig.NewSourceFile(dir, types.NodeName("node"), time.Hour, updates)
	select {
	case u := <-updates:
		pods := u.(kubetypes.PodUpdate).Pods
		if len(pods) == 1 {
			return decoded{File: file, Pod: pods[0]}
		}
		klog.Flush()
		reason := strings.TrimSpace(klogBuffer.String())
		if reason == "" {
			reason = "kubelet's file source produced no pod"
		}
		return decoded{File: file, Error: reason}
	case <-time.After(30 * time.Second):
		return decoded{File: file, Error: "kubelet's file source sent nothing within 30s"}
	}
}

// decodePolicies reads each file with kube-apiserver's own audit policy loader.
func decodePolicies(files []string) error {
	captureKlog()
	out := json.NewEncoder(os.Stdout)
	for _, file := range files {
		line := decoded{File: file}
		internal, err := policy.LoadPolicyFromFile(file)
		if err != nil {
			line.Error = err.Error()
		} else {
			external := &auditv1.Policy{}
			if err := audit.Scheme.Convert(internal, external, nil); err != nil {
				line.Error = fmt.Sprintf("converting to audit.k8s.io/v1: %v", err)
			} else {
				line.Policy = external
			}
		}
		if err := out.Encode(line); err != nil {
			return err
		}
	}
	return nil
}
