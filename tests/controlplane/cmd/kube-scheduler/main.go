// Command kube-scheduler is the upstream kube-scheduler, built from k8s.io/kubernetes: `kubeadm
// init` writes its static pod and waits for it on the real node tier.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	os.Exit(cli.Run(app.NewSchedulerCommand()))
}
