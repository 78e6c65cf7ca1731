"""From the cluster's objects to the node's desired files and manifest: the whole decision, pure."""

from __future__ import annotations

import difflib
import hashlib
import posixpath
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kube_audit.constants import API_VERSION, AUDIT_POLICY, AUDIT_USER
from kube_audit.core import yamlio
from kube_audit.core.identities import render_identity_snapshot
from kube_audit.core.manifest import (
    WEBHOOK_CONFIG_FLAG,
    Manifest,
    ManifestConfig,
    config_hash_of,
    flag_value,
    patch_manifest,
    webhook_ca_of,
)
from kube_audit.core.models import (
    AuditPolicy,
    AuditUser,
    PartialUser,
    SecretData,
    parse_audit_user,
    parse_secret,
)
from kube_audit.core.policy import parse_audit_policy, render_audit_policy
from kube_audit.core.settings import Settings, go_duration_seconds
from kube_audit.core.tokens import render_token_file
from kube_audit.core.users import UserResolution, identity_problems, resolve_users
from kube_audit.errors import InvalidInput, Problem

TOKEN_FILE = "tokens.csv"
# kube-apiserver keeps a webhook's success this much longer than its cache TTL (measured on the
# real apiserver: tests/controlplane/test_authn_webhook.py).
SUCCESS_CACHE_EXTRA = 10.0
POLICY_FILE = "audit-policy.yaml"
# Webhook mode: in the config folder itself, not in a content folder. It embeds this node's own
# webhook CA, so it differs per node and stays out of the content hash the nodes compare; it is
# written once, before a manifest names it.
WEBHOOK_KUBECONFIG = "authn-webhook.kubeconfig"


@dataclass(frozen=True)
class Inputs:
    """Validated objects, plus the problems of those that did not validate."""

    users: tuple[AuditUser, ...] = ()
    policies: tuple[AuditPolicy, ...] = ()
    secrets: tuple[SecretData, ...] = ()
    problems: tuple[Problem, ...] = ()
    # Users whose spec has errors, without the refused fields: never rendered, but checked
    # with the settings too, so every error of an object is reported at once.
    invalid_users: tuple[PartialUser, ...] = ()


@dataclass(frozen=True)
class DesiredState:
    """What the node should have: file name -> bytes (none at all: manage nothing)."""

    files: Mapping[str, bytes]
    config_hash: str
    users: UserResolution
    policies_accepted: tuple[str, ...]
    problems: tuple[Problem, ...]
    settings: Settings = field(default_factory=Settings)
    # The people of ``files``' token file, tokens as digests: what the authn-webhook answers
    # from. Kept in both modes, so a switch to webhook mode finds it answering already.
    identities: bytes = b""
    # Node-local, set by the node agent in webhook mode: its webhook CA's fingerprint, which
    # the manifest carries outside the config hash (``WEBHOOK_CA_ANNOTATION``).
    webhook_ca: str | None = None

    @property
    def webhook_mode(self) -> bool:
        return self.settings.identity_mode == "webhook"

    @property
    def token_lines(self) -> frozenset[bytes]:
        """The token file's lines these people would have, in either mode: what a node that
        runs a token file (a rollback to one in webhook mode included) may keep of its own."""
        if TOKEN_FILE in self.files or not self.webhook_mode:
            return frozenset(self.files.get(TOKEN_FILE, b"").splitlines())
        return frozenset(render_token_file(self.users.records).splitlines())

    @property
    def config_subdir(self) -> str:
        """Host folder of this exact content; the manifest switch is the single commit point."""
        return posixpath.join(self.settings.config_dir, self.config_hash[:16])

    def manifest_config(self) -> ManifestConfig:
        s = self.settings
        return ManifestConfig(
            config_dir=s.config_dir,
            log_dir=s.log_dir,
            config_hash=self.config_hash,
            token_file=posixpath.join(self.config_subdir, TOKEN_FILE)
            if TOKEN_FILE in self.files
            else None,
            policy_file=posixpath.join(self.config_subdir, POLICY_FILE)
            if POLICY_FILE in self.files
            else None,
            log_path=posixpath.join(s.log_dir, s.log_file),
            log_maxage=s.log_maxage,
            log_maxbackup=s.log_maxbackup,
            log_maxsize=s.log_maxsize,
            log_compress=s.log_compress,
            webhook_config=posixpath.join(s.config_dir, WEBHOOK_KUBECONFIG)
            if self.webhook_mode
            else None,
            webhook_cache_ttl=s.webhook_cache_ttl,
            webhook_ca=self.webhook_ca if self.webhook_mode else None,
        )


def _kind_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    return str(obj.get("apiVersion") or ""), str(obj.get("kind") or "")


def collect_inputs(documents: Iterable[tuple[str, Any]]) -> Inputs:
    """Sort (source, object) pairs into validated users, policies and Secrets.

    ``source`` names where a document came from (``file.yaml#2``) for objects without a name.
    Lists (``kind: List`` or ``*List``) are flattened, as kubectl does.
    """
    users: dict[str, AuditUser] = {}
    policies: dict[str, AuditPolicy] = {}
    secrets: dict[tuple[str, str], SecretData] = {}
    problems: list[Problem] = []
    invalid_users: list[PartialUser] = []
    defined_in: dict[str, str] = {}

    def once(ref: str, source: str) -> None:
        """A second definition names both places (files and documents)."""
        if ref in defined_in:
            first = defined_in[ref]
            problems.append(
                Problem(ref, "metadata.name", f"is defined twice: {first} and {source}")
            )
        else:
            defined_in[ref] = source

    def add(source: str, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, Mapping):
            problems.append(Problem(source, "", "is not a Kubernetes object (a mapping)"))
            return
        api_version, kind = _kind_of(obj)
        if kind.endswith("List") and isinstance(obj.get("items"), list):
            for i, item in enumerate(obj["items"]):
                add(f"{source}.items[{i}]", item)
            return
        try:
            if api_version == API_VERSION and kind == AUDIT_USER:
                user = parse_audit_user(obj)
                once(user.ref, source)
                users[user.meta.name] = user
            elif api_version == API_VERSION and kind == AUDIT_POLICY:
                policy = parse_audit_policy(obj)
                once(policy.ref, source)
                policies[policy.meta.name] = policy
            elif api_version == "v1" and kind == "Secret":
                secret = parse_secret(obj)
                secrets[(secret.namespace, secret.name)] = secret
            else:
                problems.append(Problem(source, "kind", _unknown_kind(api_version, kind)))
        except InvalidInput as error:
            problems.extend(error.problems)
            if isinstance(error.partial, PartialUser):
                invalid_users.append(error.partial)

    for source, obj in documents:
        add(source, obj)
    return Inputs(
        users=tuple(users[k] for k in sorted(users)),
        policies=tuple(policies[k] for k in sorted(policies)),
        secrets=tuple(secrets[k] for k in sorted(secrets)),
        problems=tuple(sorted(problems)),
        invalid_users=tuple(invalid_users),
    )


KNOWN_KINDS = {AUDIT_USER: API_VERSION, AUDIT_POLICY: API_VERSION, "Secret": "v1"}


def _unknown_kind(api_version: str, kind: str) -> str:
    """What is wrong and, where a known kind is near, what was probably meant."""
    text = (
        f"{api_version or '?'} {kind or '?'} is not an AuditUser, AuditPolicy ({API_VERSION}) "
        "or v1 Secret"
    )
    if kind in KNOWN_KINDS:
        return f"{text}: {kind} needs apiVersion {KNOWN_KINDS[kind]}"
    by_case = {k.lower(): k for k in KNOWN_KINDS}
    close = difflib.get_close_matches(kind, list(KNOWN_KINDS), n=1, cutoff=0.6)
    meant = by_case.get(kind.lower()) or (close[0] if close else None)
    return f"{text}; did you mean {meant}?" if meant else text


def parse_documents(text: str, source: str) -> list[tuple[str, Any]]:
    """Split multi-document YAML (or JSON) into (``source#N``, object) pairs."""
    try:
        docs = list(yamlio.load_all(text))
    except yamlio.YAMLError as error:
        where, why = yamlio.locate(source, error)
        raise InvalidInput([Problem(where, "", f"not valid YAML: {why}")]) from None
    return [(f"{source}#{i + 1}", doc) for i, doc in enumerate(docs) if doc is not None]


def config_hash(files: Mapping[str, bytes], settings: Settings) -> str:
    """A content hash of the files and the flags that point at them."""
    digest = hashlib.sha256()
    s = settings
    digest.update(
        f"{s.config_dir}\0{s.log_dir}\0{s.log_file}\0{s.log_maxage}\0{s.log_maxbackup}\0"
        f"{s.log_maxsize}\0".encode()
    )
    if s.log_compress:  # only when on: the hash of every existing config stays what it was
        digest.update(b"compress\0")
    if s.identity_mode == "webhook":  # likewise
        digest.update(f"webhook\0{s.webhook_cache_ttl}\0".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name])
    return digest.hexdigest()


def plan_desired(
    inputs: Inputs,
    settings: Settings,
    *,
    unreadable: Collection[str] = (),
    now: datetime | None = None,
) -> DesiredState:
    """Render both files from the valid objects; invalid ones are reported and left out.
    ``unreadable``: namespaces whose Secrets the operator has no grant to read; ``now``: users
    whose spec.expiresAt is not after it are left out (None: none is)."""
    resolution = resolve_users(
        inputs.users, inputs.secrets, settings, unreadable=unreadable, now=now
    )
    files: dict[str, bytes] = {}
    webhook = settings.identity_mode == "webhook"
    if resolution.records and not webhook:
        files[TOKEN_FILE] = render_token_file(resolution.records)
    policy = render_audit_policy(inputs.policies)
    if policy is not None:
        files[POLICY_FILE] = policy
    return DesiredState(
        files=files,
        # Webhook mode is managed with no people and no policy too: the first person then
        # needs no restart.
        config_hash=config_hash(files, settings) if files or webhook else "",
        identities=render_identity_snapshot(
            resolution.records,
            go_duration_seconds(settings.webhook_cache_ttl) + SUCCESS_CACHE_EXTRA,
            resolution.fingerprint_key,
        ),
        users=resolution,
        policies_accepted=tuple(p.meta.name for p in inputs.policies),
        problems=tuple(
            sorted(
                {
                    *inputs.problems,
                    *resolution.problems,
                    *(
                        u.kept.original(p, "spec")
                        for u in inputs.invalid_users
                        for p in identity_problems(u.user, settings)
                    ),
                }
            )
        ),
        settings=settings,
    )


def plan_manifest(current: Manifest, desired: DesiredState) -> Manifest:
    """The manifest the node should run: patched for the desired files, or unpatched if none.

    A manifest written before 0.3.0 names the webhook without its CA's fingerprint: which CA
    its apiserver read is not known, and the fingerprint alone is no reason for a restart
    (an upgrade restarts nothing), so it comes with the node's next change."""
    config = desired.manifest_config()
    new = patch_manifest(current, config)
    unknown = config.webhook_ca and webhook_ca_of(current) is None and config_hash_of(current)
    if unknown and patch_manifest(current, replace(config, webhook_ca=None)) == current:
        return current
    return new


def removes_identities_only(
    current: Manifest, current_files: Mapping[str, bytes], running_hash: str, desired: DesiredState
) -> bool:
    """Whether going from what the node runs to ``desired`` only takes token lines away (a
    person deleted or disabled): the same policy and settings, and no line added or changed.
    Such a change cannot be what made an apiserver fail, so no failure mark holds it back."""
    running_tokens = current_files.get(TOKEN_FILE)
    if not running_hash or running_tokens is None:
        return False
    if desired.files.get(POLICY_FILE) != current_files.get(POLICY_FILE):
        return False
    wanted = desired.files.get(TOKEN_FILE, b"")
    if wanted == running_tokens:
        return False
    same_files = {**desired.files, TOKEN_FILE: running_tokens}
    as_running = replace(desired, files=same_files, config_hash=running_hash)
    if plan_manifest(current, as_running) != current:
        return False
    return set(wanted.splitlines()) <= set(running_tokens.splitlines())


def running_settings(current: Manifest, base: Settings) -> Settings | None:
    """The settings the running manifest was made with, read back from its flags (``base``
    for what a manifest does not show): the running config rebuilt whatever the operator's
    settings are now, a token-file config a webhook-mode node was rolled back to included.
    None when a flag does not read as we write it (edited by hand)."""
    token_file = flag_value(current, "--token-auth-file")
    policy_file = flag_value(current, "--audit-policy-file")
    folder = token_file or policy_file
    settings = replace(base, identity_mode="token-file")
    if folder:
        settings = replace(settings, config_dir=posixpath.dirname(posixpath.dirname(folder)))
    ttl = flag_value(current, "--authentication-token-webhook-cache-ttl")
    if flag_value(current, WEBHOOK_CONFIG_FLAG) is not None:
        settings = replace(settings, identity_mode="webhook", webhook_cache_ttl=ttl or "")
    log_path = flag_value(current, "--audit-log-path")
    if policy_file and log_path:
        try:
            settings = replace(
                settings,
                log_dir=posixpath.dirname(log_path),
                log_file=posixpath.basename(log_path),
                log_maxage=int(flag_value(current, "--audit-log-maxage") or ""),
                log_maxbackup=int(flag_value(current, "--audit-log-maxbackup") or ""),
                log_maxsize=int(flag_value(current, "--audit-log-maxsize") or ""),
                log_compress=flag_value(current, "--audit-log-compress") == "true",
            )
        except ValueError:
            return None
    return settings


def plan_revocation(
    current: Manifest, current_files: Mapping[str, bytes], running_hash: str, desired: DesiredState
) -> DesiredState | None:
    """What the node may run while ``desired`` is held back: the running config with every
    token line ``desired``'s people no longer have taken out, and nothing else changed.

    A refused AuditPolicy must not keep a deleted or disabled person's token live: the held
    content carries that policy, this one does not. Nor may a rollback: in webhook mode the
    held content names no people at all (they are in the snapshot), so a node rolled back to a
    token file is brought to the people of ``desired`` here, in the mode and with the settings
    it runs. A line ``desired`` changed (new groups, a new token) goes too, so the node never
    grants more than either config. None when nothing would be taken away, or the running
    config cannot be rebuilt exactly."""
    running_tokens = current_files.get(TOKEN_FILE)
    settings = running_settings(current, desired.settings)
    if not running_hash or running_tokens is None or settings is None:
        return None
    wanted = desired.token_lines
    kept = b"".join(
        line for line in running_tokens.splitlines(keepends=True) if line.rstrip(b"\r\n") in wanted
    )
    if kept == running_tokens:
        return None
    files = {name: data for name, data in current_files.items() if name != TOKEN_FILE}
    if kept:
        files[TOKEN_FILE] = kept
    step_hash = config_hash(files, settings) if files else ""
    step = replace(desired, files=files, config_hash=step_hash, settings=settings)
    return step if removes_identities_only(current, current_files, running_hash, step) else None
