package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	kubeletv1beta1 "k8s.io/kubelet/config/v1beta1"
	kubeletconfig "k8s.io/kubernetes/pkg/kubelet/config"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
	"sigs.k8s.io/yaml"
)

// node is one node's stand-in kubelet: pod workers, the record and the mirror pods.
type node struct {
	hostRoot   string
	name       string
	ip         string
	pathEnv    string
	imagePaths []string
	logDir     string
	kubeconfig string
	port       int
	record     *recorder

	mu       sync.Mutex
	workers  map[string]*podWorker
	stopping bool
	wg       sync.WaitGroup
}

func runNode(argv []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	n := &node{workers: map[string]*podWorker{}}
	fs.StringVar(&n.hostRoot, "host-root", "", "the node's host tree (hostPath /x is HOST_ROOT/x)")
	fs.StringVar(&n.name, "node-name", "", "node name (mirror pods are <pod>-<node-name>)")
	fs.StringVar(&n.ip, "node-ip", "127.0.0.1", "the node's address (hostIP and podIP)")
	kubeletConfig := fs.String("kubelet-config", "/var/lib/kubelet/config.yaml", "kubelet config, a host path")
	fs.StringVar(&n.kubeconfig, "kubeconfig", "", "credentials for the mirror pods and the Node (a real path)")
	fs.StringVar(&n.pathEnv, "path", "", "folder with the containers' programs, put first on their PATH")
	fs.Func("image-path", "a host folder every container sees where it is, read-only, as files of its "+
		"image (the programs of --path and what they load; repeatable)", func(v string) error {
		n.imagePaths = append(n.imagePaths, v)
		return nil
	})
	fs.StringVar(&n.logDir, "log-dir", "", "where each container's output goes (<pod>_<container>.log)")
	fs.IntVar(&n.port, "kubelet-port", 10250, "port of the kubelet API (exec) on --node-ip; 0: none")
	clientCA := fs.String("client-ca-file", "/etc/kubernetes/pki/ca.crt", "CA of the kubelet API's clients, a host path")
	recordPath := fs.String("record", "", "JSON lines: every start, exit, readiness change and stop")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	if n.hostRoot == "" || n.name == "" || *recordPath == "" || n.logDir == "" {
		return errors.New("run needs --host-root, --node-name, --record and --log-dir")
	}
	staticPodPath, period, err := readKubeletConfig(filepath.Join(n.hostRoot, *kubeletConfig))
	if err != nil {
		return err
	}
	if n.record, err = openRecorder(*recordPath); err != nil {
		return err
	}
	if err := os.MkdirAll(n.logDir, 0o755); err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	updates := make(chan interface{}, 16)
	go kubeletconfig.NewSourceFile(filepath.Join(n.hostRoot, staticPodPath), types.NodeName(n.name), period, updates)
	if n.kubeconfig != "" {
		go n.syncMirrorPods(ctx)
		if n.port != 0 {
			if err := n.serveKubeletAPI(ctx, n.port, filepath.Join(n.hostRoot, *clientCA)); err != nil {
				return err
			}
		}
	}
	n.record.write(event{Event: "kubelet-started", Detail: staticPodPath})
	for {
		select {
		case u := <-updates:
			n.apply(u.(kubetypes.PodUpdate).Pods)
		case <-ctx.Done():
			n.mu.Lock()
			n.stopping = true
			n.mu.Unlock()
			n.apply(nil)
			n.wg.Wait()
			n.record.write(event{Event: "kubelet-stopped"})
			return nil
		}
	}
}

// readKubeletConfig finds staticPodPath and fileCheckFrequency, as kubelet does.
func readKubeletConfig(path string) (string, time.Duration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", 0, fmt.Errorf("kubelet config: %v", err)
	}
	var config kubeletv1beta1.KubeletConfiguration
	if err := yaml.Unmarshal(data, &config); err != nil {
		return "", 0, fmt.Errorf("kubelet config %s: %v", path, err)
	}
	if config.StaticPodPath == "" {
		return "", 0, fmt.Errorf("kubelet config %s has no staticPodPath", path)
	}
	period := config.FileCheckFrequency.Duration
	if period == 0 {
		period = 20 * time.Second
	}
	return config.StaticPodPath, period, nil
}

// apply hands each pod of a complete SET update to its worker; pods gone from the folder stop.
func (n *node) apply(pods []*v1.Pod) {
	n.mu.Lock()
	defer n.mu.Unlock()
	seen := map[string]bool{}
	for _, pod := range pods {
		key := pod.Namespace + "/" + pod.Name
		seen[key] = true
		worker, ok := n.workers[key]
		if !ok {
			worker = newPodWorker(n, key)
			n.workers[key] = worker
			n.wg.Add(1)
			go func() {
				defer n.wg.Done()
				worker.loop()
				n.mu.Lock()
				if n.workers[key] == worker {
					delete(n.workers, key)
				}
				n.mu.Unlock()
			}()
		}
		worker.want(pod)
	}
	for key, worker := range n.workers {
		if !seen[key] {
			worker.want(nil)
		}
	}
}

func (n *node) removalReason() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopping {
		return "kubelet stopping"
	}
	return "manifest removed or not decodable"
}

func (n *node) snapshot() []podState {
	n.mu.Lock()
	defer n.mu.Unlock()
	states := make([]podState, 0, len(n.workers))
	for _, worker := range n.workers {
		if state, ok := worker.state(); ok {
			states = append(states, state)
		}
	}
	sort.Slice(states, func(i, j int) bool { return states[i].pod.Name < states[j].pod.Name })
	return states
}

// event is one line of the record.
type event struct {
	Time      string `json:"time"`
	Event     string `json:"event"`
	Pod       string `json:"pod,omitempty"`
	Container string `json:"container,omitempty"`
	Hash      string `json:"hash,omitempty"`
	PID       int    `json:"pid,omitempty"`
	ExitCode  *int   `json:"exitCode,omitempty"`
	Detail    string `json:"detail,omitempty"`
}

type recorder struct {
	mu   sync.Mutex
	file *os.File
}

func openRecorder(path string) (*recorder, error) {
	file, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	return &recorder{file: file}, nil
}

func (r *recorder) write(e event) {
	e.Time = time.Now().UTC().Format(time.RFC3339Nano)
	line, _ := json.Marshal(e)
	r.mu.Lock()
	defer r.mu.Unlock()
	_, _ = r.file.Write(append(line, '\n'))
}

// containerCommand is what kubelet would run: command + args with $(VAR) expanded from env, and
// every volume bound at its mountPath.
func (n *node) containerCommand(pod *v1.Pod, c *v1.Container) (*exec.Cmd, error) {
	envList, err := n.containerEnv(pod, c)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, kv := range envList[3:] { // $(VAR) names the container's own env only
		name, value, _ := strings.Cut(kv, "=")
		env[name] = value
	}
	var argv []string
	for _, s := range append(append([]string{}, c.Command...), c.Args...) {
		argv = append(argv, expand(s, env))
	}
	if len(argv) == 0 {
		return nil, errors.New("no command: the stand-in has no image entrypoints")
	}
	binds, err := n.binds(pod, c)
	if err != nil {
		return nil, err
	}
	cmd, err := isolatedCommand(binds, c.WorkingDir, argv)
	if err != nil {
		return nil, err
	}
	cmd.Env = envList
	return cmd, nil
}

// containerEnv is the container's environment as kubelet builds it: PATH, HOME, HOSTNAME, then
// env in order with $(VAR) expanded; valueFrom only as a fieldRef to the pod's own fields.
func (n *node) containerEnv(pod *v1.Pod, c *v1.Container) ([]string, error) {
	env := map[string]string{}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	if n.pathEnv != "" {
		path = n.pathEnv + ":" + path
	}
	envList := []string{"PATH=" + path, "HOME=/root", "HOSTNAME=" + n.name}
	for _, e := range c.Env {
		value := expand(e.Value, env)
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				return nil, fmt.Errorf("env %s: only valueFrom.fieldRef is supported by the stand-in", e.Name)
			}
			var err error
			if value, err = n.podField(pod, e.ValueFrom.FieldRef.FieldPath); err != nil {
				return nil, fmt.Errorf("env %s: %v", e.Name, err)
			}
		}
		env[e.Name] = value
		envList = append(envList, e.Name+"="+value)
	}
	return envList, nil
}

func (n *node) podField(pod *v1.Pod, path string) (string, error) {
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.podIP":
		return n.ip, nil
	}
	return "", fmt.Errorf("fieldRef %s is not supported by the stand-in", path)
}

func (n *node) binds(pod *v1.Pod, c *v1.Container) ([]bind, error) {
	volumes := map[string]v1.Volume{}
	for _, v := range pod.Spec.Volumes {
		volumes[v.Name] = v
	}
	var binds []bind
	for _, m := range c.VolumeMounts {
		volume, ok := volumes[m.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s: no volume of that name", m.Name)
		}
		var source string
		switch {
		case volume.HostPath != nil:
			source = filepath.Join(n.hostRoot, volume.HostPath.Path)
			if err := prepareHostPath(source, volume.HostPath.Type); err != nil {
				return nil, fmt.Errorf("volume %s: %v", m.Name, err)
			}
		case volume.EmptyDir != nil:
			// Where kubelet keeps it, so it lives as long as the pod (by UID) does.
			source = filepath.Join(n.hostRoot, "var/lib/kubelet/pods", string(pod.UID),
				"volumes/kubernetes.io~empty-dir", volume.Name)
			if err := os.MkdirAll(source, 0o755); err != nil {
				return nil, fmt.Errorf("volume %s: %v", m.Name, err)
			}
		case volume.Projected != nil:
			continue // the ServiceAccount token: the stand-in mints none, nothing is mounted
		default:
			return nil, fmt.Errorf("volume %s: only hostPath, emptyDir and projected volumes are supported by the stand-in", m.Name)
		}
		if m.SubPath != "" {
			source = filepath.Join(source, m.SubPath)
		}
		binds = append(binds, bind{Source: source, Target: m.MountPath, ReadOnly: m.ReadOnly})
	}
	// The image's files stay visible even under a volume mounted over one of their parents
	// (an emptyDir on /tmp hides a checkout under /tmp otherwise).
	for _, path := range n.imagePaths {
		binds = append(binds, bind{Source: path, Target: path, ReadOnly: true})
	}
	return binds, nil
}

// prepareHostPath does kubelet's hostPath type checks and creations on the host tree.
func prepareHostPath(source string, kind *v1.HostPathType) error {
	t := v1.HostPathUnset
	if kind != nil {
		t = *kind
	}
	info, err := os.Stat(source)
	switch t {
	case v1.HostPathDirectoryOrCreate:
		if os.IsNotExist(err) {
			return os.MkdirAll(source, 0o755)
		}
	case v1.HostPathFileOrCreate:
		if os.IsNotExist(err) {
			if err := os.MkdirAll(filepath.Dir(source), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(source, os.O_CREATE|os.O_WRONLY, 0o644)
			if err != nil {
				return err
			}
			return f.Close()
		}
	case v1.HostPathDirectory:
		if err != nil || !info.IsDir() {
			return fmt.Errorf("hostPath type check failed: %s is not a directory", source)
		}
	case v1.HostPathFile:
		if err != nil || !info.Mode().IsRegular() {
			return fmt.Errorf("hostPath type check failed: %s is not a file", source)
		}
	case v1.HostPathUnset:
		if os.IsNotExist(err) {
			return fmt.Errorf("hostPath %s does not exist", source)
		}
	}
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

func expand(s string, env map[string]string) string {
	if !strings.Contains(s, "$(") {
		return s
	}
	return expansion.Expand(s, expansion.MappingFuncFor(env))
}

func (n *node) client() (*kubernetes.Clientset, error) {
	config, err := clientcmd.BuildConfigFromFlags("", n.kubeconfig)
	if err != nil {
		return nil, err
	}
	config.Timeout = 5 * time.Second
	config.UserAgent = "kubelet-standin/" + n.name
	return kubernetes.NewForConfig(config)
}
