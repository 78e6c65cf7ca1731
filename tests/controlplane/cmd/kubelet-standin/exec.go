package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/client-go/tools/remotecommand"
	certutil "k8s.io/client-go/util/cert"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// serveKubeletAPI serves the one part of kubelet's API that `kubectl exec` (pods/exec) needs:
// kube-apiserver dials the Node's InternalIP at its kubelet port with its kubelet client
// certificate (kubeadm's --kubelet-client-certificate), so only clients whose certificate the
// cluster CA signed are served, as kubelet's x509 authentication does.
//
// The stand-in runs no container for a pod that is not static: the tier runs such a pod's main
// process itself (the operator), so an exec runs the command as kubelet would run it in that
// container: the container's env (fieldRef included) and its volumes bound at their mountPaths,
// in a private mount namespace.
func (n *node) serveKubeletAPI(ctx context.Context, port int, clientCAFile string) error {
	caPEM, err := os.ReadFile(clientCAFile)
	if err != nil {
		return fmt.Errorf("kubelet API client CA: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("kubelet API client CA %s: no certificate in it", clientCAFile)
	}
	certPEM, keyPEM, err := certutil.GenerateSelfSignedCertKey(n.name, []net.IP{net.ParseIP(n.ip)}, nil)
	if err != nil {
		return err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/exec/", n.handleExec)
	server := &http.Server{
		Addr:    net.JoinHostPort(n.ip, strconv.Itoa(port)),
		Handler: mux,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			MinVersion:   tls.VersionTLS12,
		},
		ReadHeaderTimeout: 10 * time.Second,
	}
	listener, err := net.Listen("tcp", server.Addr)
	if err != nil {
		return fmt.Errorf("kubelet API: %v", err)
	}
	go func() {
		<-ctx.Done()
		_ = server.Close()
	}()
	go func() {
		if err := server.ServeTLS(listener, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "kubelet API: %v\n", err)
		}
	}()
	return nil
}

// handleExec is kubelet's /exec/{namespace}/{pod}/{container} (and /exec/{ns}/{pod}/{uid}/{container}).
func (n *node) handleExec(w http.ResponseWriter, req *http.Request) {
	parts := strings.Split(strings.TrimPrefix(req.URL.Path, "/exec/"), "/")
	if len(parts) != 3 && len(parts) != 4 {
		http.Error(w, "want /exec/{namespace}/{pod}/{container}", http.StatusNotFound)
		return
	}
	namespace, name, containerName := parts[0], parts[1], parts[len(parts)-1]
	client, err := n.client()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	pod, err := client.CoreV1().Pods(namespace).Get(req.Context(), name, metav1.GetOptions{})
	if err != nil {
		http.Error(w, fmt.Sprintf("pod %s/%s: %v", namespace, name, err), http.StatusNotFound)
		return
	}
	if pod.Spec.NodeName != n.name {
		http.Error(w, fmt.Sprintf("pod %s/%s is not on node %s", namespace, name, n.name), http.StatusNotFound)
		return
	}
	var container *v1.Container
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == containerName {
			container = &pod.Spec.Containers[i]
		}
	}
	if container == nil {
		http.Error(w, fmt.Sprintf("pod %s/%s has no container %q", namespace, name, containerName), http.StatusNotFound)
		return
	}
	options, err := remotecommandserver.NewOptions(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	command := req.URL.Query()["command"]
	n.record.write(event{Event: "exec", Pod: namespace + "/" + name, Detail: strings.Join(command, " ")})
	remotecommandserver.ServeExec(w, req, &podExecutor{node: n, pod: pod, container: container}, name,
		pod.UID, containerName, command, options, 4*time.Hour, remotecommandconsts.DefaultStreamCreationTimeout,
		remotecommandconsts.SupportedStreamingProtocols)
}

type podExecutor struct {
	node      *node
	pod       *v1.Pod
	container *v1.Container
}

// ExecInContainer runs cmd in the container's view; a non-zero exit reaches the client as its code.
func (e *podExecutor) ExecInContainer(ctx context.Context, _ string, _ types.UID, _ string, cmd []string,
	in io.Reader, out, errOut io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize, _ time.Duration) error {
	if tty {
		return errors.New("the stand-in has no terminals: exec without -t")
	}
	if len(cmd) == 0 {
		return errors.New("no command")
	}
	env, err := e.node.containerEnv(e.pod, e.container)
	if err != nil {
		return err
	}
	binds, err := e.node.binds(e.pod, e.container)
	if err != nil {
		return err
	}
	run, err := isolatedCommand(binds, e.container.WorkingDir, cmd)
	if err != nil {
		return err
	}
	run.Env = env
	run.Stdin, run.Stdout, run.Stderr = in, out, errOut
	go func() {
		<-ctx.Done()
		if run.Process != nil {
			_ = run.Process.Kill()
		}
	}()
	err = run.Run()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return utilexec.CodeExitError{Err: err, Code: exitErr.ExitCode()}
	}
	return err
}
