package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"
)

const (
	backoffStart = 10 * time.Second // kubelet's crash-loop back-off: 10s, doubled, at most 5 min
	backoffMax   = 5 * time.Minute
)

// podWorker runs one static pod: the newest wanted version, stopping the old one first (kubelet
// waits for a static pod to terminate before it starts its replacement), restarting containers
// that exit with kubelet's back-off.
type podWorker struct {
	node    *node
	key     string
	wanted  chan *v1.Pod // capacity 1: only the newest version matters
	exits   chan exitNote
	restart chan restartNote

	mu         sync.Mutex
	pod        *v1.Pod
	containers []*container
	generation int
}

type container struct {
	spec       v1.Container
	process    *os.Process
	pid        int
	started    time.Time
	running    bool
	ready      bool
	restarts   int
	lastExit   *v1.ContainerStateTerminated
	waiting    string
	cancel     context.CancelFunc
	exited     chan struct{}
	generation int
}

type exitNote struct {
	index, generation int
	code              int
}

type restartNote struct{ index, generation int }

type podState struct {
	pod        *v1.Pod
	containers []containerState
}

type containerState struct {
	name           string
	image          string
	pid            int
	started        time.Time
	running, ready bool
	restarts       int
	lastExit       *v1.ContainerStateTerminated
	waiting        string
}

func newPodWorker(n *node, key string) *podWorker {
	return &podWorker{
		node:    n,
		key:     key,
		wanted:  make(chan *v1.Pod, 1),
		exits:   make(chan exitNote, 8),
		restart: make(chan restartNote, 8),
	}
}

// want replaces whatever version is waiting with pod (nil: stop the pod and end the worker).
func (w *podWorker) want(pod *v1.Pod) {
	for {
		select {
		case w.wanted <- pod:
			return
		default:
			select {
			case <-w.wanted:
			default:
			}
		}
	}
}

func (w *podWorker) loop() {
	for {
		select {
		case pod := <-w.wanted:
			current := w.currentPod()
			if current != nil && (pod == nil || hashOf(pod) != hashOf(current)) {
				reason := "manifest changed"
				if pod == nil {
					reason = w.node.removalReason()
				}
				w.stopAll(reason)
				if pod == nil {
					w.node.record.write(event{Event: "pod-removed", Pod: current.Name, Hash: hashOf(current)})
				}
			}
			if pod == nil {
				return
			}
			if w.currentPod() == nil {
				w.startAll(pod)
			}
		case note := <-w.exits:
			w.exited(note)
		case note := <-w.restart:
			w.mu.Lock()
			ok := note.generation == w.generation && note.index < len(w.containers) &&
				!w.containers[note.index].running
			w.mu.Unlock()
			if ok {
				w.startContainer(note.index)
			}
		}
	}
}

func (w *podWorker) currentPod() *v1.Pod {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pod
}

func hashOf(pod *v1.Pod) string { return pod.Annotations[kubetypes.ConfigHashAnnotationKey] }

func (w *podWorker) startAll(pod *v1.Pod) {
	w.mu.Lock()
	w.generation++
	w.pod = pod
	w.containers = nil
	for _, spec := range pod.Spec.Containers {
		w.containers = append(w.containers, &container{spec: spec, generation: w.generation})
	}
	count := len(w.containers)
	w.mu.Unlock()
	for i := 0; i < count; i++ {
		w.startContainer(i)
	}
}

func (w *podWorker) startContainer(index int) {
	w.mu.Lock()
	pod, c := w.pod, w.containers[index]
	w.mu.Unlock()
	cmd, err := w.node.containerCommand(pod, &c.spec)
	var logFile *os.File
	if err == nil {
		name := fmt.Sprintf("%s_%s.log", pod.Name, c.spec.Name)
		logFile, err = os.OpenFile(filepath.Join(w.node.logDir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	}
	if err == nil {
		cmd.Stdout, cmd.Stderr = logFile, logFile
		err = cmd.Start()
		logFile.Close()
	}
	if err != nil {
		w.node.record.write(event{Event: "start-failed", Pod: pod.Name, Container: c.spec.Name, Hash: hashOf(pod), Detail: err.Error()})
		w.mu.Lock()
		c.waiting = "CreateContainerConfigError"
		w.mu.Unlock()
		w.scheduleRestart(index, c)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.mu.Lock()
	c.process, c.pid, c.started, c.running, c.ready, c.waiting = cmd.Process, cmd.Process.Pid, time.Now(), true, false, ""
	c.cancel, c.exited = cancel, make(chan struct{})
	generation, exited := c.generation, c.exited
	w.mu.Unlock()
	w.node.record.write(event{Event: "start", Pod: pod.Name, Container: c.spec.Name, Hash: hashOf(pod), PID: cmd.Process.Pid})
	go w.probe(ctx, index, pod, &c.spec)
	go func() {
		err := cmd.Wait()
		code := 0
		if err != nil {
			code = -1
			if status, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
				code = status.ExitStatus()
				if status.Signaled() {
					code = 128 + int(status.Signal())
				}
			}
		}
		cancel()
		close(exited)
		w.exits <- exitNote{index: index, generation: generation, code: code}
	}()
}

func (w *podWorker) exited(note exitNote) {
	w.mu.Lock()
	if note.generation != w.generation || note.index >= len(w.containers) {
		w.mu.Unlock()
		return
	}
	c := w.containers[note.index]
	if !c.running {
		w.mu.Unlock()
		return
	}
	c.running, c.ready = false, false
	c.lastExit = &v1.ContainerStateTerminated{ExitCode: int32(note.code), Reason: "Error"}
	c.waiting = "CrashLoopBackOff"
	pod, pid := w.pod, c.pid
	w.mu.Unlock()
	code := note.code
	w.node.record.write(event{Event: "exit", Pod: pod.Name, Container: c.spec.Name, Hash: hashOf(pod), PID: pid, ExitCode: &code})
	w.scheduleRestart(note.index, c)
}

func (w *podWorker) scheduleRestart(index int, c *container) {
	w.mu.Lock()
	delay := backoffStart << min(c.restarts, 5)
	if delay > backoffMax {
		delay = backoffMax
	}
	c.restarts++
	generation := c.generation
	w.mu.Unlock()
	time.AfterFunc(delay, func() { w.restart <- restartNote{index: index, generation: generation} })
}

// stopAll stops every container as kubelet does: SIGTERM, then SIGKILL after the grace period.
func (w *podWorker) stopAll(reason string) {
	w.mu.Lock()
	pod, containers := w.pod, w.containers
	w.generation++
	w.mu.Unlock()
	grace := 30 * time.Second
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	for _, c := range containers {
		w.mu.Lock()
		running, pid, exited := c.running, c.pid, c.exited
		c.running = false
		w.mu.Unlock()
		if !running {
			continue
		}
		w.node.record.write(event{Event: "stopping", Pod: pod.Name, Container: c.spec.Name, Hash: hashOf(pod), PID: pid, Detail: reason})
		_ = syscall.Kill(-pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(grace):
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-exited
		}
		w.node.record.write(event{Event: "stop", Pod: pod.Name, Container: c.spec.Name, Hash: hashOf(pod), PID: pid, Detail: reason})
	}
	w.mu.Lock()
	w.pod, w.containers = nil, nil
	w.mu.Unlock()
}

// probe runs the readiness probe (httpGet or tcpSocket); no probe means ready once started.
func (w *podWorker) probe(ctx context.Context, index int, pod *v1.Pod, spec *v1.Container) {
	probe := spec.ReadinessProbe
	setReady := func(ready bool) {
		w.mu.Lock()
		if index >= len(w.containers) || w.containers[index].cancel == nil {
			w.mu.Unlock()
			return
		}
		c := w.containers[index]
		changed := c.running && c.ready != ready
		if changed {
			c.ready = ready
		}
		name := c.spec.Name
		w.mu.Unlock()
		if changed {
			what := "unready"
			if ready {
				what = "ready"
			}
			w.node.record.write(event{Event: what, Pod: pod.Name, Container: name, Hash: hashOf(pod)})
		}
	}
	if probe == nil {
		setReady(true)
		return
	}
	period := time.Duration(max(probe.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(probe.TimeoutSeconds, 1)) * time.Second
	failures, threshold := 0, int(max(probe.FailureThreshold, 1))
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(probe.InitialDelaySeconds) * time.Second):
	}
	for {
		if probeOnce(ctx, probe, spec.Ports, w.node.ip, timeout) {
			failures = 0
			setReady(true)
		} else if failures++; failures >= threshold {
			setReady(false)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(period):
		}
	}
}

var probeClient = &http.Client{Transport: &http.Transport{
	TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // as kubelet's prober does
	DisableKeepAlives: true,
}}

// portNumber resolves a probe's port, by number or by the name of one of the container's ports.
func portNumber(port intstr.IntOrString, ports []v1.ContainerPort) int {
	if port.Type == intstr.Int {
		return port.IntValue()
	}
	for _, p := range ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort)
		}
	}
	return 0
}

func probeOnce(ctx context.Context, probe *v1.Probe, ports []v1.ContainerPort, podIP string, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case probe.HTTPGet != nil:
		get := probe.HTTPGet
		host := get.Host
		if host == "" {
			host = podIP
		}
		scheme := "http"
		if get.Scheme == v1.URISchemeHTTPS {
			scheme = "https"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(portNumber(get.Port, ports))), get.Path)
		request, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false
		}
		response, err := probeClient.Do(request)
		if err != nil {
			return false
		}
		response.Body.Close()
		return response.StatusCode >= 200 && response.StatusCode < 400
	case probe.TCPSocket != nil:
		host := probe.TCPSocket.Host
		if host == "" {
			host = podIP
		}
		var dialer net.Dialer
		conn, err := dialer.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(portNumber(probe.TCPSocket.Port, ports))))
		if err != nil {
			return false
		}
		conn.Close()
		return true
	}
	return true
}

func (w *podWorker) state() (podState, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.pod == nil {
		return podState{}, false
	}
	state := podState{pod: w.pod}
	for _, c := range w.containers {
		state.containers = append(state.containers, containerState{
			name: c.spec.Name, image: c.spec.Image, pid: c.pid, started: c.started,
			running: c.running, ready: c.ready, restarts: c.restarts,
			lastExit: c.lastExit, waiting: c.waiting,
		})
	}
	return state, true
}
