//go:build tools

// Package tools records the CoreDNS command this module builds (hack/build-node.sh).
package tools

import _ "github.com/coredns/coredns"
