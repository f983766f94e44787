// Wrapper module that pins prometheus-operator, whose CRDs (PrometheusRule, PodMonitor)
// the e2e tests install to check pgscale's rendered objects against the real schema.
// hack/promop/crds.sh downloads the module (into the Go module cache, outside the
// checkout) and prints the CRD files' paths.
module pgscale.io/hack/promop

go 1.24.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
