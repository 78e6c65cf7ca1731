"""Token Secrets: read (with consent checked by the apiserver), created, rotated."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from kube_audit.constants import ROTATED_FOR, TOKEN_FOR_LABEL, TOKEN_LABEL
from kube_audit.core.models import SecretData, parse_secret
from kube_audit.errors import ClusterError, Conflict, InvalidInput, NotFound
from kube_audit.kube.transport import MERGE_PATCH, Transport, secret_path


class Secrets(Transport):
    def read_secret(self, namespace: str, name: str) -> tuple[SecretData, dict[str, Any]] | None:
        try:
            raw = self._json(f"read Secret {namespace}/{name}", "GET", secret_path(namespace, name))
        except NotFound:
            return None
        raw.setdefault("metadata", {}).setdefault("namespace", namespace)
        try:
            return parse_secret(raw), raw
        except InvalidInput as error:
            raise ClusterError(str(error)) from None

    def read_consenting_secret(self, namespace: str, name: str, user: str) -> dict[str, Any] | None:
        """Secret ``namespace/name`` only if it carries the consent label for ``user``. The
        apiserver filters (label and field selectors), so the data of a Secret that did not
        consent never reaches this process."""
        if len(user) > 63:  # not a label value: no Secret can consent to such a name
            return None
        query = {
            "labelSelector": f"{TOKEN_FOR_LABEL}={user}",
            "fieldSelector": f"metadata.name={name}",
        }
        for item in self._items(
            f"read Secret {namespace}/{name} if it consents", secret_path(namespace), query
        ):
            item.setdefault("metadata", {}).setdefault("namespace", namespace)
            return item
        return None

    def list_token_secrets(self, namespace: str) -> list[dict[str, Any]]:
        """The Secrets the operator made (found by their label)."""
        items = []
        for item in self._items(
            f"list Secrets in {namespace}",
            secret_path(namespace),
            {"labelSelector": f"{TOKEN_LABEL}=true"},
        ):
            item.setdefault("metadata", {}).setdefault("namespace", namespace)
            items.append(item)
        return items

    def create_key_secret(
        self, namespace: str, name: str, key: str, value: str
    ) -> dict[str, Any] | None:
        """Create a Secret holding one key of the operator's own (the fingerprint key); None
        when another pod was first (409)."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "data": {key: base64.b64encode(value.encode()).decode()},
        }
        return self._create_secret(namespace, name, body)

    def _create_secret(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        try:
            raw = self._json(
                f"create Secret {namespace}/{name}", "POST", secret_path(namespace), body=body
            )
        except Conflict:
            return None
        raw.setdefault("metadata", {}).setdefault("namespace", namespace)
        return raw

    def create_token_secret(
        self, namespace: str, name: str, token: str, owner: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Create the Secret; None when another writer was first (409), else the new object."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {TOKEN_LABEL: "true"},
                "ownerReferences": [dict(owner)],
            },
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }
        return self._create_secret(namespace, name, body)

    def rotate_token_secret(
        self, namespace: str, name: str, token: str, nonce: str, resource_version: str
    ) -> bool:
        """Replace the token once per rotation request; False if someone else changed it first."""
        body = {
            "metadata": {"resourceVersion": resource_version, "annotations": {ROTATED_FOR: nonce}},
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }
        return self._write_unless_conflict(
            f"rotate Secret {namespace}/{name}",
            "PATCH",
            secret_path(namespace, name),
            body=body,
            content_type=MERGE_PATCH,
        )
