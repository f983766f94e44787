// The pod sandbox's pause program for the local test node (hack/build-node.sh):
// no registry is reachable, so the sandbox image is built here around it.
module pgscale.io/hack/pause

go 1.24.0
