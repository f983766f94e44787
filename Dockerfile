# pgscale operator image: `pgscale run` by default, `pgscale job ...` in Jobs.
# Multi-stage: dependencies resolved from uv.lock in a build stage; the runtime stage is
# a slim Python with the virtualenv only, running as a non-root numeric user, and works
# with a read-only root filesystem (write access is needed under /tmp only).
FROM python:3.11-slim-bookworm AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/pgscale
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY operator ./operator
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="pgscale" \
      org.opencontainers.image.description="Kubernetes operator that scales the Postgres an application already has" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/pgscale /opt/pgscale
ENV PATH=/opt/pgscale/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PGSCALE_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["pgscale"]
CMD ["run", "--all-namespaces"]
