#!/usr/bin/env bash
# make image: the operator's image without a Docker engine or a registry.
#
#   layer 1  Debian bookworm (mmdebstrap, the mirror apt uses here), Debian's python3, and a venv
#            /opt/venv holding the project's dependencies (wheels fetched on this host by pip)
#   layer 2  the project itself, installed into that venv (overlayfs over layer 1, so the layer
#            holds exactly what the install added)
#
# Written as a docker-archive under build/image/ that `ctr -n k8s.io images import` and
# `docker load` take. Same inputs, same layer digests: tar entries are sorted, owned by 0:0 and
# dated SOURCE_DATE_EPOCH; .pyc files are hash-checked, never dated. Each layer is rebuilt only
# when its inputs change (seconds otherwise). Needs root (mmdebstrap, chroot, overlayfs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${IMAGE_OUT:-$ROOT/build/image}
PYTHON=${PYTHON:-python3}
SUITE=bookworm
SOURCES=${DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}
REPO=ghcr.io/kube-audit/kube-audit-operator
LOCAL=local/kube-audit-operator
VENV=/opt/venv

step() { STEP=$1; echo "make image: $1"; }
fail() { echo "make image: step '$STEP' failed: $*" >&2; exit 1; }
trap 'code=$?; [ $code -eq 0 ] || echo "make image: step '"'"'${STEP:-start}'"'"' failed (exit $code)" >&2' EXIT

step "check tools"
[ "$(id -u)" = 0 ] || fail "needs root (mmdebstrap, chroot and overlayfs mounts)"
for tool in mmdebstrap umoci skopeo unshare tar sha256sum; do
  command -v "$tool" >/dev/null || fail "'$tool' is missing (apt-get install mmdebstrap umoci skopeo)"
done
[ -r "$SOURCES" ] || fail "no Debian sources file at $SOURCES (set DEBIAN_SOURCES)"
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' operator/kube_audit/__init__.py)
[ -n "$VERSION" ] || fail "no __version__ in operator/kube_audit/__init__.py"
ARCHIVE=$OUT/kube-audit-operator-$VERSION.tar

# Keys: what each layer is made of. Layer 1 changes with the dependencies and this script,
# layer 2 with the project's sources too.
hash_files() { sha256sum "$@" | sha256sum | cut -c1-16; }
BASE_KEY=$(hash_files image/build.sh pyproject.toml "$SOURCES")
APP_KEY=$(hash_files image/build.sh pyproject.toml setup.py README.md $(find operator -type f -not -path '*/__pycache__/*' | LC_ALL=C sort))
if [ -f "$ARCHIVE" ] && [ "$(cat "$OUT/archive.key" 2>/dev/null)" = "$BASE_KEY-$APP_KEY" ]; then
  echo "make image: $ARCHIVE is up to date"
  exit 0
fi
# The newest commit of the inputs dates every file: a rebuild of the same commit is identical.
EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- pyproject.toml setup.py operator image 2>/dev/null || echo 0)}
# `kube-audit --version` names that same commit (setup.py records it in the wheel).
export KUBE_AUDIT_COMMIT=${KUBE_AUDIT_COMMIT:-$(git log -1 --format=%H -- pyproject.toml setup.py operator image 2>/dev/null || true)}
BASE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- pyproject.toml image 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH=$EPOCH
mkdir -p "$OUT"

# A layer as a tar: sorted, 0:0, one date, no atime/ctime: the same files give the same bytes.
layer_tar() { # DIR OUT EPOCH
  tar --create --file "$2.tmp" --directory "$1" --sort=name --numeric-owner --owner=0 \
    --group=0 --mtime="@$3" --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime --xattrs \
    --xattrs-exclude='*' .
  mv "$2.tmp" "$2"
}

step "wheels from PyPI"
WHEELS=$OUT/wheels
rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir \
  --wheel-dir "$WHEELS.tmp" . \
  || fail "pip could not build the project or fetch its dependencies from PyPI"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$WHEELS.tmp" pip || fail "pip could not fetch pip's own wheel from PyPI"
rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
APP_WHEEL=$(ls "$WHEELS"/kube_audit_operator-*.whl)
PIP_WHEEL=$(ls "$WHEELS"/pip-*.whl)

BASE=$OUT/base-$BASE_KEY
if [ ! -f "$BASE/layer.tar" ]; then
  step "layer 1: Debian $SUITE, python3 and the dependencies (mmdebstrap)"
  rm -rf "$OUT"/base-* && mkdir -p "$BASE/wheels"
  for w in "$WHEELS"/*.whl; do
    [ "$w" = "$APP_WHEEL" ] || cp "$w" "$BASE/wheels/"
  done
  # mmdebstrap mounts /proc, /sys and /dev in the target: keep them in a private namespace.
  # kubernetes/aio is the client's asyncio twin (68 MB of the image), imported by nothing here.
  SOURCE_DATE_EPOCH=$BASE_EPOCH unshare --mount --propagation private -- \
    env -u PIP_FIND_LINKS -u PIP_CERT mmdebstrap --quiet --variant=minbase --mode=root \
    --format=directory --include=python3 \
    --customize-hook="cp -r '$BASE/wheels' \"\$1/tmp/wheels\"" \
    --customize-hook="chroot \"\$1\" python3 -m venv --without-pip $VENV" \
    --customize-hook="chroot \"\$1\" env -i PATH=/usr/bin:/bin $VENV/bin/python /tmp/wheels/$(basename "$PIP_WHEEL")/pip install --quiet --no-index --no-compile --disable-pip-version-check --find-links /tmp/wheels \$(cd \"\$1/tmp/wheels\" && ls *.whl | grep -v '^pip-' | sed 's|^|/tmp/wheels/|')" \
    --customize-hook="rm -rf \"\$1$VENV/lib/python3.11/site-packages/kubernetes/aio\"" \
    --customize-hook="chroot \"\$1\" $VENV/bin/python -m compileall -q --invalidation-mode unchecked-hash $VENV/lib" \
    --customize-hook="rm -rf \"\$1/tmp/wheels\" \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/* \"\$1\"/var/log/* \"\$1\"/usr/share/doc \"\$1\"/usr/share/man \"\$1\"/usr/share/info \"\$1\"/usr/share/locale" \
    "$SUITE" "$BASE/rootfs" "$SOURCES" \
    || fail "mmdebstrap could not build the Debian root filesystem (is the Debian mirror in $SOURCES reachable?)"
  layer_tar "$BASE/rootfs" "$BASE/layer.tar" "$BASE_EPOCH"
  rm -rf "$BASE/wheels"
fi

step "layer 2: the project (overlayfs over layer 1)"
APP=$OUT/app
rm -rf "$APP" && mkdir -p "$APP/upper" "$APP/work" "$APP/merged"
unshare --mount --propagation private -- bash -euo pipefail -c '
  mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/upper,workdir=$2/work" "$2/merged"
  mkdir "$2/merged/tmp/w" && cp "$3" "$4" "$2/merged/tmp/w/"
  chroot "$2/merged" env -i PATH=/usr/bin:/bin "$5/bin/python" "/tmp/w/$(basename "$4")/pip" install \
    --quiet --no-index --no-deps --no-compile --disable-pip-version-check --find-links /tmp/w \
    kube-audit-operator
  chroot "$2/merged" "$5/bin/python" -m compileall -q --invalidation-mode unchecked-hash \
    "$5/lib/python3.11/site-packages/kube_audit"
  rm -rf "$2/merged/tmp/w"
' _ "$BASE/rootfs" "$APP" "$APP_WHEEL" "$PIP_WHEEL" "$VENV" || fail "installing the project into the venv failed"
if find "$APP/upper" -type c | grep -q .; then
  fail "the install removed files of layer 1 (overlayfs whiteouts): $(find "$APP/upper" -type c | head -3)"
fi
layer_tar "$APP/upper" "$APP/layer.tar" "$EPOCH"

step "image config and archive (umoci, skopeo)"
LAYOUT=$OUT/oci
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
rm -rf "$LAYOUT" && umoci init --layout "$LAYOUT" >/dev/null
umoci new --image "$LAYOUT:$VERSION"
umoci raw add-layer --image "$LAYOUT:$VERSION" --history.created "$CREATED" \
  --history.created_by "image/build.sh: Debian $SUITE, python3, the dependencies" "$BASE/layer.tar"
umoci raw add-layer --image "$LAYOUT:$VERSION" --history.created "$CREATED" \
  --history.created_by "image/build.sh: kube-audit-operator $VERSION" "$APP/layer.tar"
umoci config --no-history --image "$LAYOUT:$VERSION" --os linux --architecture amd64 \
  --created "$CREATED" --author kube-audit \
  --config.entrypoint kube-audit --config.cmd operator --config.workingdir / \
  --config.env "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.env PYTHONUNBUFFERED=1 --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.label org.opencontainers.image.title=kube-audit-operator \
  --config.label "org.opencontainers.image.version=$VERSION" \
  --config.label "org.opencontainers.image.revision=${KUBE_AUDIT_COMMIT:-unknown}" \
  --config.label org.opencontainers.image.licenses=Apache-2.0
rm -f "$ARCHIVE.tmp"
# Tagged with the release name (deploy/ runs it unchanged once imported) and a local one.
skopeo copy --quiet --additional-tag "$LOCAL:$VERSION" \
  "oci:$LAYOUT:$VERSION" "docker-archive:$ARCHIVE.tmp:$REPO:$VERSION" \
  || fail "skopeo could not write the image archive"
mv "$ARCHIVE.tmp" "$ARCHIVE"
echo "$BASE_KEY-$APP_KEY" > "$OUT/archive.key"

step "report"
digest() { echo "sha256:$(sha256sum "$1" | cut -c1-64) ($(du -m "$1" | cut -f1) MB)"; }
echo "make image: $ARCHIVE ($(du -m "$ARCHIVE" | cut -f1) MB uncompressed)"
echo "  tags:    $REPO:$VERSION and $LOCAL:$VERSION (docker.io/$LOCAL:$VERSION once imported)"
echo "  layer 1: $(digest "$BASE/layer.tar")"
echo "  layer 2: $(digest "$APP/layer.tar")"
rm -rf "$APP" "$LAYOUT"
