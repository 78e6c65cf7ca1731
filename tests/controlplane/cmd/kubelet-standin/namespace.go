package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// inNamespaceCommand is the hidden step that runs inside the new mount namespace: a Go process
// cannot unshare its own mount namespace once it has threads, so the parent asks the kernel for
// one at fork time and the child does the mounts, then execs the program.
const inNamespaceCommand = "__in-namespace"

// bind is one hostPath volume: Source on the host tree, Target where the program sees it.
type bind struct {
	Source   string
	Target   string
	ReadOnly bool
}

func (b bind) String() string {
	s := b.Source + ":" + b.Target
	if b.ReadOnly {
		s += ":ro"
	}
	return s
}

func parseBind(value string) (bind, error) {
	parts := strings.Split(value, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return bind{}, fmt.Errorf("--bind %q: want SRC:DST or SRC:DST:ro", value)
	}
	b := bind{Source: parts[0], Target: parts[1]}
	if len(parts) == 3 {
		if parts[2] != "ro" && parts[2] != "rw" {
			return bind{}, fmt.Errorf("--bind %q: the third part is ro or rw", value)
		}
		b.ReadOnly = parts[2] == "ro"
	}
	return b, nil
}

type bindList []bind

func (l *bindList) String() string { return fmt.Sprint(*l) }
func (l *bindList) Set(v string) error {
	b, err := parseBind(v)
	if err == nil {
		*l = append(*l, b)
	}
	return err
}

// isolatedCommand builds the command that runs argv with binds in a private mount namespace.
func isolatedCommand(binds []bind, workDir string, argv []string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{inNamespaceCommand}
	for _, b := range binds {
		args = append(args, "--bind", b.String())
	}
	if workDir != "" {
		args = append(args, "--chdir", workDir)
	}
	args = append(args, "--")
	args = append(args, argv...)
	cmd := exec.Command(self, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Unshareflags: syscall.CLONE_NEWNS,
		Setpgid:      true,
		Pdeathsig:    syscall.SIGKILL,
	}
	return cmd, nil
}

// execIsolated is `kubelet-standin exec`: run one command with binds, wait, pass its status on.
func execIsolated(argv []string) error {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	var binds bindList
	fs.Var(&binds, "bind", "SRC:DST[:ro] bind mount (repeatable)")
	workDir := fs.String("chdir", "", "working directory")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("exec: no command given after --")
	}
	cmd, err := isolatedCommand(binds, *workDir, fs.Args())
	if err != nil {
		return err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		for s := range signals {
			_ = syscall.Kill(-cmd.Process.Pid, s.(syscall.Signal))
		}
	}()
	err = cmd.Wait()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return exitCode(exitErr.ExitCode())
	}
	return err
}

// inNamespace mounts the binds (shortest target first, so nested ones land on top) and execs.
func inNamespace(argv []string) error {
	fs := flag.NewFlagSet(inNamespaceCommand, flag.ContinueOnError)
	var binds bindList
	fs.Var(&binds, "bind", "")
	workDir := fs.String("chdir", "", "")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return errors.New("no command")
	}
	sort.SliceStable(binds, func(i, j int) bool {
		return strings.Count(binds[i].Target, "/") < strings.Count(binds[j].Target, "/")
	})
	// Every source is opened before anything is mounted: a volume mounted at /tmp would
	// otherwise hide the sources of the others when the host tree itself lives under /tmp.
	sources := make([]string, len(binds))
	for i, b := range binds {
		fd, err := unix.Open(b.Source, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("hostPath %s: %v", b.Source, err)
		}
		defer unix.Close(fd)
		sources[i] = fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	for i, b := range binds {
		if err := mountBind(b, sources[i]); err != nil {
			return err
		}
	}
	if *workDir != "" {
		if err := os.Chdir(*workDir); err != nil {
			return err
		}
	}
	path, err := exec.LookPath(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("container command %q: %v", fs.Arg(0), err)
	}
	return syscall.Exec(path, fs.Args(), os.Environ())
}

// mountBind mounts source (b.Source, opened as a /proc/self/fd path) on b.Target.
func mountBind(b bind, source string) error {
	info, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("hostPath %s: %v", b.Source, err)
	}
	if info.IsDir() {
		err = os.MkdirAll(b.Target, 0o755)
	} else if _, statErr := os.Stat(b.Target); os.IsNotExist(statErr) {
		if err = os.MkdirAll(filepath.Dir(b.Target), 0o755); err == nil {
			var f *os.File
			if f, err = os.OpenFile(b.Target, os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
				err = f.Close()
			}
		}
	}
	if err != nil {
		return fmt.Errorf("mount point %s: %v", b.Target, err)
	}
	if err := syscall.Mount(source, b.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %v", b.Source, b.Target, err)
	}
	if b.ReadOnly {
		flags := uintptr(syscall.MS_BIND | syscall.MS_REMOUNT | syscall.MS_RDONLY | syscall.MS_REC)
		if err := syscall.Mount("", b.Target, "", flags, ""); err != nil {
			return fmt.Errorf("read-only remount of %s: %v", b.Target, err)
		}
	}
	return nil
}
