// Wrapper module that pins CloudNativePG, whose CRDs (Cluster, Pooler) the e2e tests of the
// cloudnativepg settings method install into the local kube-apiserver. hack/cnpg/crds.sh
// downloads the module (into the Go module cache, verified against go.sum), copies the CRDs
// to ~/.cache/pgscale/cnpg/<version>/ (outside the checkout) and prints their paths.
module pgscale.io/hack/cnpg

go 1.24.0

require github.com/cloudnative-pg/cloudnative-pg v1.28.1
