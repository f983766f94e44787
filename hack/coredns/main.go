// Command coredns is CoreDNS v1.12 with only the plugins the test node's Corefile uses
// (hack/node.py). Building the stock command compiles every plugin and its cloud SDKs
// (Route 53, Azure, Cloud DNS, Datadog tracing): about six minutes of a cold CI run on
// two cores, for a DNS server that only answers cluster.local. Plugins register
// themselves in init(); dnsserver.Directives keeps CoreDNS's own order.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
