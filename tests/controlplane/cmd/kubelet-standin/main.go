// Command kubelet-standin does what kubelet does with one node's static pod folder, without a
// container runtime: it reads the folder with kubelet's own file source (so a manifest kubelet
// cannot decode is refused here too), runs each pod's container as a process in a private mount
// namespace where every hostPath volume is bind-mounted at its mountPath, restarts it when the
// manifest changes, keeps the mirror pod in the API up to date and records every start and stop.
// It also serves kubelet's exec API, so `kubectl exec` reaches pods bound to its node.
//
//	kubelet-standin run --host-root DIR --node-name NAME --kubeconfig FILE --record FILE --log-dir DIR [--kubelet-port N]
//	kubelet-standin decode-pod FILE...           (kubelet's static pod decoder; JSON lines)
//	kubelet-standin decode-audit-policy FILE...  (kube-apiserver's policy reader; JSON lines)
//	kubelet-standin decode-token-file FILE...    (kube-apiserver's --token-auth-file reader; JSON lines)
//	kubelet-standin exec [--bind SRC:DST[:ro]]... -- COMMAND [ARG]...  (in a private mount namespace)
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = runNode(os.Args[2:])
	case "decode-pod":
		err = decodePods(os.Args[2:])
	case "decode-audit-policy":
		err = decodePolicies(os.Args[2:])
	case "decode-token-file":
		err = decodeTokenFiles(os.Args[2:])
	case "exec":
		err = execIsolated(os.Args[2:])
	case inNamespaceCommand:
		err = inNamespace(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubelet-standin: %v\n", err)
		if code, ok := err.(exitCode); ok {
			os.Exit(int(code))
		}
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kubelet-standin run|decode-pod|decode-audit-policy|decode-token-file|exec ...")
	os.Exit(2)
}

// exitCode carries a child's exit status through main.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }
