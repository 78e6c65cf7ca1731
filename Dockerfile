# kube-audit-operator: the DaemonSet's image. Build: docker build -t kube-audit-operator:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="kube-audit-operator" \
      org.opencontainers.image.description="Per-person identities and audit logging for kubeadm clusters" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Runs as root: it edits root-owned, mode-0600 files on the host (static pod manifests, the token
# file). The DaemonSet drops every capability and forbids privilege escalation.
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["kube-audit"]
CMD ["operator"]
