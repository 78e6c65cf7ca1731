# kube-audit-operator: the DaemonSet's image, for those who build with Docker. It describes the
# image `make image` builds without Docker (image/build.sh), the one the real node tests run:
# Debian bookworm, Debian's python3, a venv /opt/venv with the project and its dependencies.
#   docker build --build-arg COMMIT=$(git rev-parse HEAD) -t ghcr.io/kube-audit/kube-audit-operator:0.2.0 .
# VERSION must equal kube_audit.__version__ (a test checks it; the release workflow passes it).
ARG VERSION=0.2.0
ARG COMMIT=unknown

FROM debian:bookworm-slim AS wheels
ARG COMMIT
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY operator ./operator
RUN KUBE_AUDIT_COMMIT=$COMMIT /build/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
    && /build/bin/pip download --no-cache-dir --no-deps --only-binary=:all: --dest /wheels pip

FROM debian:bookworm-slim
ARG VERSION
ARG COMMIT
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale
# No pip and no wheels are left in the image; kubernetes/aio (the client's asyncio twin, 68 MB)
# is imported by nothing here.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python3 -m venv --without-pip /opt/venv \
    && /opt/venv/bin/python "$(ls /wheels/pip-*.whl)/pip" install --no-index --no-compile \
       --disable-pip-version-check --find-links /wheels kube-audit-operator \
    && rm -rf /opt/venv/lib/python3.11/site-packages/kubernetes/aio \
    && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib
LABEL org.opencontainers.image.title="kube-audit-operator" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$COMMIT" \
      org.opencontainers.image.licenses="Apache-2.0"
# Runs as root: it edits root-owned, mode-0600 files on the host (static pod manifests, the token
# file). The DaemonSet drops every capability and forbids privilege escalation.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["kube-audit"]
CMD ["operator"]
