#!/usr/bin/env bash
# release/install-yaml.sh IMAGE@DIGEST [OUT]: the release asset install.yaml, deploy/ built by
# kustomize with the operator's image pinned by digest (a tag can be moved, a digest cannot).
#   kubectl apply -f https://github.com/kube-audit/kube-audit-operator/releases/download/vX.Y.Z/install.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?usage: release/install-yaml.sh IMAGE@sha256:DIGEST [OUT]}
out=${2:-build/release/install.yaml}
name=${ref%@*}
digest=${ref#*@}
[[ $ref == *@sha256:* && ${#digest} -eq 71 ]] || { echo "install-yaml: '$ref' is not IMAGE@sha256:<64 hex>" >&2; exit 2; }
mkdir -p build
overlay=$(mktemp -d build/.install-yaml.XXXXXX)
trap 'rm -rf "$overlay"' EXIT
cat > "$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy
images:
  - name: ghcr.io/kube-audit/kube-audit-operator
    newName: $name
    digest: $digest
YAML
mkdir -p "$(dirname "$out")"
{
  echo "# kube-audit-operator $(sed -n 's/^__version__ = "\(.*\)"$/\1/p' operator/kube_audit/__init__.py): kubectl apply -f install.yaml"
  kubectl kustomize "$overlay"
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out (image $ref)"
