"""Pure builders of the Kubernetes objects pgscale owns (like CloudNativePG's pkg/specs).

The one rule of this package: no I/O. Every function takes parsed specs and plain
values and returns a dict ready for server-side apply (or the text of a file such an
object carries), so each builder is unit-tested by comparing values; the controllers
apply what they return.

- builders: names, labels, owner references, Jobs and CronJobs of the policies
- pooling: PgBouncer's configuration and the objects that run it
- replicas: read replicas' slot names, StatefulSet, ConfigMap and Services
- alerting: prometheus-operator's PrometheusRule and PodMonitor
"""
