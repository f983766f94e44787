"""pgscale: a Kubernetes operator that scales the Postgres an application already has."""

__version__ = "0.1.0"
