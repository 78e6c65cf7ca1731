// Command kubelet is the upstream kubelet, built from k8s.io/kubernetes: the real node tier runs
// kubeadm's static pods and the DaemonSet's pods with it through containerd.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
