// Command etcd is the upstream etcd server, the 3.6 line that k8s.io/apiserver v0.34 requires.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
