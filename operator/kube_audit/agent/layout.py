"""Where things are on a control-plane host, seen through ``--host-root``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kube_audit import hostfs
from kube_audit.core import yamlio
from kube_audit.core.settings import Settings
from kube_audit.errors import HostError, NodeConfigError

DEFAULT_KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
DEFAULT_STATIC_POD_PATH = "/etc/kubernetes/manifests"
STATE_DIR = "/var/lib/kube-audit"
MANIFEST_NAME = "kube-apiserver.yaml"


def under(root: Path, host_path: str) -> Path:
    """A host path (absolute, as the apiserver sees it) inside the host root."""
    return root / PurePosixPath(host_path).relative_to("/")


def static_pod_path(root: Path, kubelet_config: str) -> str:
    """kubelet's ``staticPodPath`` (host path), or kubeadm's default when it is not set."""
    data = hostfs.read_optional(under(root, kubelet_config))
    if data is None:
        return DEFAULT_STATIC_POD_PATH
    try:
        config = yamlio.load(data)
    except yamlio.YAMLError as error:
        raise NodeConfigError(
            f"kubelet config {yamlio.explain(str(kubelet_config), error)}"
        ) from None
    value = config.get("staticPodPath") if isinstance(config, dict) else None
    if value is None:
        return DEFAULT_STATIC_POD_PATH
    if not isinstance(value, str) or not value.startswith("/"):
        raise NodeConfigError(
            f"kubelet config {kubelet_config}: staticPodPath {value!r} is not absolute"
        )
    return value


@dataclass(frozen=True)
class HostLayout:
    root: Path
    settings: Settings
    static_pod_dir: Path
    state_dir: Path

    @classmethod
    def discover(
        cls, root: Path, settings: Settings, kubelet_config: str = DEFAULT_KUBELET_CONFIG
    ) -> HostLayout:
        root = root.resolve()
        if not root.is_dir():
            raise HostError(f"host root {root} is not a folder")
        return cls(
            root=root,
            settings=settings,
            static_pod_dir=under(root, static_pod_path(root, kubelet_config)),
            state_dir=under(root, STATE_DIR),
        )

    @property
    def manifest(self) -> Path:
        return self.static_pod_dir / MANIFEST_NAME

    @property
    def config_dir(self) -> Path:
        return under(self.root, self.settings.config_dir)

    @property
    def log_dir(self) -> Path:
        return under(self.root, self.settings.log_dir)

    @property
    def backups(self) -> Path:
        return self.state_dir / "backups"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def identity_snapshot(self) -> Path:
        """Webhook mode: the people, tokens as digests, that ``authn-webhook`` answers from."""
        return self.webhook_dir / "identities.json"

    @property
    def webhook_dir(self) -> Path:
        """All the authn-webhook container mounts: the snapshot and its serving certificate and
        key. Nothing else (no backup, no CA key) is in its reach."""
        return self.state_dir / "authn-webhook"

    @property
    def webhook_ca_dir(self) -> Path:
        """The webhook's own CA, its key included: the operator container's alone."""
        return self.state_dir / "authn-webhook-ca"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"

    def host(self, host_path: str) -> Path:
        return under(self.root, host_path)
