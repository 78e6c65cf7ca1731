"""Patch and unpatch the kube-apiserver static pod manifest, keeping everything else as it was.

What we set is recorded in the manifest itself (annotation ``kube-audit.io/patched-flags``: each
flag we set and the value it had before, if any), so ``unpatch_manifest`` restores the original
exactly, even after a restart of the operator or a move to another node.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from kube_audit.core import yamlio
from kube_audit.errors import ManifestError

HASH_ANNOTATION = "kube-audit.io/config-hash"
FLAGS_ANNOTATION = "kube-audit.io/patched-flags"
# Webhook mode: the fingerprint of the node's webhook CA, which kube-apiserver reads (from the
# webhook kubeconfig) only at its start. Node-local, outside the config hash: a new CA on disk
# changes the manifest, so the apiserver restarts through the normal apply and trusts it.
WEBHOOK_CA_ANNOTATION = "kube-audit.io/webhook-ca"
CONFIG_VOLUME = "kube-audit-config"
LOG_VOLUME = "kube-audit-log"
CONTAINER = "kube-apiserver"
WEBHOOK_CONFIG_FLAG = "--authentication-token-webhook-config-file"
PATH_FLAGS = ("--token-auth-file", "--audit-policy-file", "--audit-log-path", WEBHOOK_CONFIG_FLAG)
# Audit backends of someone else's: dormant without a policy file, so adding ours would switch
# them on (the webhook would start shipping events to wherever it points).
FOREIGN_BACKEND_FLAGS = ("--audit-webhook-config-file",)
MANAGED_FLAGS = (
    "--token-auth-file",
    "--audit-policy-file",
    "--audit-log-path",
    "--audit-log-format",
    "--audit-log-maxage",
    "--audit-log-maxbackup",
    "--audit-log-maxsize",
    "--audit-log-compress",
    WEBHOOK_CONFIG_FLAG,
    "--authentication-token-webhook-version",
    "--authentication-token-webhook-cache-ttl",
)

Manifest = dict[str, Any]


@dataclass(frozen=True)
class ManifestConfig:
    """What the patched apiserver should use. Paths are host paths, mounted at the same path."""

    config_dir: str
    log_dir: str
    config_hash: str
    token_file: str | None = None
    policy_file: str | None = None
    log_path: str = ""
    log_maxage: int = 30
    log_maxbackup: int = 10
    log_maxsize: int = 100
    log_compress: bool = False
    # Webhook mode: the kubeconfig that points kube-apiserver at the node's authn-webhook.
    webhook_config: str | None = None
    webhook_cache_ttl: str = "10s"
    # The node's webhook CA fingerprint (WEBHOOK_CA_ANNOTATION), in webhook mode.
    webhook_ca: str | None = None

    def flags(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.token_file:
            out["--token-auth-file"] = self.token_file
        if self.policy_file:
            out["--audit-policy-file"] = self.policy_file
            out["--audit-log-path"] = self.log_path
            out["--audit-log-format"] = "json"
            out["--audit-log-maxage"] = str(self.log_maxage)
            out["--audit-log-maxbackup"] = str(self.log_maxbackup)
            out["--audit-log-maxsize"] = str(self.log_maxsize)
            if self.log_compress:
                out["--audit-log-compress"] = "true"
        if self.webhook_config:
            out[WEBHOOK_CONFIG_FLAG] = self.webhook_config
            out["--authentication-token-webhook-version"] = "v1"  # the default is v1beta1
            out["--authentication-token-webhook-cache-ttl"] = self.webhook_cache_ttl
        return out


def parse_manifest(text: str, source: str = "kube-apiserver.yaml") -> Manifest:
    """Load a static pod manifest, refusing anything that is not a Pod with a kube-apiserver."""
    try:
        docs = [d for d in yamlio.load_all(text) if d is not None]
    except yamlio.YAMLError as error:
        raise ManifestError(yamlio.explain(source, error)) from None
    if len(docs) > 1:
        raise ManifestError(
            f"{source}: holds {len(docs)} YAML documents; kubelet runs only the first and "
            "ignores the rest, and kube-audit would drop them when it rewrites the file: "
            "remove the others first"
        )
    doc = docs[0] if docs else None
    if not isinstance(doc, dict) or doc.get("kind") != "Pod":
        raise ManifestError(f"{source}: not a Pod manifest")
    apiserver_container(doc, source)
    return doc


def render_manifest(manifest: Manifest) -> str:
    """kubeadm's own YAML style: block style, keys in their original order."""
    return yamlio.dump(manifest)


def apiserver_container(manifest: Manifest, source: str = "manifest") -> dict[str, Any]:
    containers = (manifest.get("spec") or {}).get("containers") or []
    for container in containers:
        if isinstance(container, dict) and container.get("name") == CONTAINER:
            return container
    raise ManifestError(
        f"{source}: spec.containers has no container named {CONTAINER!r}; "
        "this is not a kube-apiserver static pod, refusing to change it"
    )


def apiserver_identity(manifest: Manifest) -> tuple[int, int] | None:
    """(uid, gid) kube-apiserver runs as when it is not root (kubeadm's RootlessControlPlane
    sets runAsUser/runAsGroup); None for root. The container's securityContext wins."""
    pod = (manifest.get("spec") or {}).get("securityContext") or {}
    own = apiserver_container(manifest).get("securityContext") or {}
    uid = own.get("runAsUser", pod.get("runAsUser"))
    gid = own.get("runAsGroup", pod.get("runAsGroup"))
    if not isinstance(uid, int) or uid == 0:
        return None
    return uid, gid if isinstance(gid, int) else uid


def _flag_name(arg: Any) -> str:
    return str(arg).split("=", 1)[0]


def _arg_lists(container: dict[str, Any]) -> list[list[Any]]:
    return [
        lst for lst in (container.get("command"), container.get("args")) if isinstance(lst, list)
    ]


def flag_value(manifest: Manifest, flag: str) -> str | None:
    """The value of ``--flag=value`` on the kube-apiserver container, or None."""
    for lst in _arg_lists(apiserver_container(manifest)):
        for arg in lst:
            if isinstance(arg, str) and arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def config_hash_of(manifest: Manifest) -> str | None:
    value = ((manifest.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return str(value) if value is not None else None


def unpatch_manifest(manifest: Manifest) -> Manifest:
    """The manifest as it was before we patched it: our flags, volumes and annotations removed."""
    out = copy.deepcopy(manifest)
    annotations = (out.get("metadata") or {}).get("annotations") or {}
    if HASH_ANNOTATION not in annotations and FLAGS_ANNOTATION not in annotations:
        return out
    try:
        patched: dict[str, str | None] = json.loads(annotations.get(FLAGS_ANNOTATION) or "{}")
    except json.JSONDecodeError:
        raise ManifestError(
            f"annotation {FLAGS_ANNOTATION} is not valid JSON; restore the manifest from a backup"
        ) from None
    container = apiserver_container(out)
    for lst in _arg_lists(container):
        kept = []
        for arg in lst:
            name = _flag_name(arg)
            if name in patched:
                original = patched[name]
                if original is not None:
                    kept.append(original)
            else:
                kept.append(arg)
        lst[:] = kept
    _remove_named(container, "volumeMounts", (CONFIG_VOLUME, LOG_VOLUME))
    _remove_named(out.get("spec") or {}, "volumes", (CONFIG_VOLUME, LOG_VOLUME))
    annotations.pop(HASH_ANNOTATION, None)
    annotations.pop(FLAGS_ANNOTATION, None)
    annotations.pop(WEBHOOK_CA_ANNOTATION, None)
    if not annotations and "annotations" in out.get("metadata", {}):
        del out["metadata"]["annotations"]
    return out


def _remove_named(parent: dict[str, Any], key: str, names: tuple[str, ...]) -> None:
    items = parent.get(key)
    if not isinstance(items, list):
        return
    items[:] = [i for i in items if not (isinstance(i, dict) and i.get("name") in names)]
    if not items:
        del parent[key]


def _check_not_foreign(base: Manifest, config: ManifestConfig) -> None:
    """Refuse to take over settings someone else made: that could lock their users out."""
    container = apiserver_container(base)
    seen: dict[str, list[str]] = {}
    for lst in _arg_lists(container):
        for arg in lst:
            seen.setdefault(_flag_name(arg), []).append(str(arg))
    for flag in MANAGED_FLAGS:
        if len(seen.get(flag, ())) > 1:
            given = ", ".join(repr(a) for a in seen[flag])
            raise ManifestError(
                f"kube-apiserver has {flag} {len(seen[flag])} times ({given}); the last one wins "
                "there, so kube-audit will not replace one and leave another: keep one and apply "
                "again"
            )
    for flag in FOREIGN_BACKEND_FLAGS:
        if flag in seen and config.policy_file:
            raise ManifestError(
                f"kube-apiserver already has {seen[flag][0]!r}, an audit backend kube-audit does "
                "not own: it is dormant without a policy file, and adding kube-audit's policy "
                "would switch it on; remove it (or move its policy into AuditPolicy objects and "
                "keep the webhook yourself) before installing kube-audit"
            )
    for lst in _arg_lists(container):
        for arg in lst:
            if arg in MANAGED_FLAGS:
                raise ManifestError(
                    f"kube-apiserver has {arg!r} as a separate argument; write it as "
                    f"'{arg}=VALUE' or remove it before installing kube-audit"
                )
            name = _flag_name(arg)
            if name in PATH_FLAGS:
                raise ManifestError(
                    f"kube-apiserver already has {arg!r}, a file kube-audit does not own; "
                    "refusing to replace it (move its entries into AuditUser/AuditPolicy objects "
                    "and remove the flag, then apply again)"
                )
    taken_paths = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    taken_names = {v.get("name") for v in (base.get("spec") or {}).get("volumes") or []}
    for name, path in ((CONFIG_VOLUME, config.config_dir), (LOG_VOLUME, config.log_dir)):
        if name in taken_names:
            raise ManifestError(f"spec.volumes already has a volume named {name!r} not made by us")
        if path in taken_paths:
            raise ManifestError(
                f"kube-apiserver already mounts {path!r}; choose another folder for kube-audit"
            )


def _volume(name: str, path: str) -> dict[str, Any]:
    return {"hostPath": {"path": path, "type": "DirectoryOrCreate"}, "name": name}


def patch_manifest(manifest: Manifest, config: ManifestConfig) -> Manifest:
    """Set our flags, mount our folders and stamp the content hash; idempotent.

    Patching starts from the unpatched manifest, so ``patch(patch(x)) == patch(x)`` and
    ``unpatch(patch(x)) == x`` hold by construction. With nothing to set (no token file, no
    policy, not webhook mode) the result is the unpatched manifest.
    """
    base = unpatch_manifest(manifest)
    flags = config.flags()
    if not flags:
        return base
    _check_not_foreign(base, config)
    out = copy.deepcopy(base)
    container = apiserver_container(out)
    patched: dict[str, str | None] = {}
    lists = _arg_lists(container)
    for flag, value in flags.items():
        new_arg = f"{flag}={value}"
        for lst in lists:
            for i, arg in enumerate(lst):
                if _flag_name(arg) == flag and flag not in patched:
                    patched[flag] = str(arg)
                    lst[i] = new_arg
        if flag not in patched:
            patched[flag] = None
            target = (
                container.get("command") if isinstance(container.get("command"), list) else None
            )
            if target is None:
                target = container.setdefault("args", [])
            target.append(new_arg)
    mounts = container.setdefault("volumeMounts", [])
    volumes = out.setdefault("spec", {}).setdefault("volumes", [])
    mounts.append({"mountPath": config.config_dir, "name": CONFIG_VOLUME, "readOnly": True})
    volumes.append(_volume(CONFIG_VOLUME, config.config_dir))
    if config.policy_file:
        mounts.append({"mountPath": config.log_dir, "name": LOG_VOLUME, "readOnly": False})
        volumes.append(_volume(LOG_VOLUME, config.log_dir))
    metadata = out.setdefault("metadata", {})
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        annotations = metadata["annotations"] = {}
    annotations[HASH_ANNOTATION] = config.config_hash
    annotations[FLAGS_ANNOTATION] = json.dumps(patched, sort_keys=True, separators=(",", ":"))
    if config.webhook_config and config.webhook_ca:
        annotations[WEBHOOK_CA_ANNOTATION] = config.webhook_ca
    return out


def webhook_ca_of(manifest: Manifest) -> str | None:
    """The webhook CA fingerprint a manifest was written with (None: none, or before 0.3.0)."""
    value = ((manifest.get("metadata") or {}).get("annotations") or {}).get(WEBHOOK_CA_ANNOTATION)
    return str(value) if value is not None else None
