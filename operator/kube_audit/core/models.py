"""Custom resource models (pydantic, at the boundary) and the plain values the core works on."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kube_audit.constants import AUDIT_POLICY, AUDIT_USER, TOKEN_FOR_LABEL
from kube_audit.errors import InvalidInput, Problem

Name = Annotated[str, Field(min_length=1, max_length=253)]
Url = Annotated[str, Field(min_length=1, max_length=512)]
Namespace = Annotated[str, Field(max_length=63)]
MAX_ITEMS = 256
Level = Literal["None", "Metadata", "Request", "RequestResponse"]
Stage = Literal["RequestReceived", "ResponseStarted", "ResponseComplete", "Panic"]
STAGE_ORDER: tuple[str, ...] = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")


class _Spec(BaseModel):
    """Strict camelCase model: unknown fields are refused, as a structural CRD schema would."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        strict=True,
    )


# RFC 3339 (a date, a time and a zone), as the CRD's ``format: date-time`` checks it.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time as an aware datetime; ValueError names what is expected."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 time with a zone, e.g. 2027-01-31T18:00:00Z")
    return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))


class SecretKeyRef(_Spec):
    """Where an AuditUser's token lives when it is not the default Secret."""

    namespace: str = Field(min_length=1, max_length=63, description="Namespace of the Secret.")
    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(
        default="token", min_length=1, max_length=253, description="Key in the Secret's data."
    )


class AuditUserSpec(_Spec):
    """One person: the identity kube-apiserver gives to whoever presents the token."""

    username: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="User name kube-apiserver gives this person; defaults to metadata.name.",
    )
    uid: str | None = Field(
        default=None, min_length=1, max_length=253, description="UID; defaults to the username."
    )
    groups: list[Name] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Groups the user belongs to (RBAC subjects of kind Group).",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the token; default Secret kube-audit/audituser-<name>.",
    )
    disabled: bool = Field(
        default=False, description="A disabled user keeps its object but its token stops working."
    )
    expires_at: str | None = Field(
        default=None,
        description="RFC 3339 time (with Z or an offset) from which the token no longer works: "
        "refused by the webhook at that second, removed from the token file then; the object "
        "stays, Ready False with reason Expired.",
        json_schema_extra={"format": "date-time"},
    )

    @field_validator("expires_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        """A plain timestamp in a YAML file reaches us as a datetime (PyYAML); Go's YAML reader
        keeps it as the string, which the API then checks: the same instant either way."""
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"{value.isoformat()} has no zone; add Z or an offset")
            return value.isoformat()
        if isinstance(value, date):
            raise ValueError(f"{value.isoformat()} is a date; give a time and a zone, e.g. "
                             f"{value.isoformat()}T00:00:00Z")  # fmt: skip
        if isinstance(value, str):
            parse_rfc3339(value)
        return value


class GroupResources(_Spec):
    """audit.k8s.io/v1 GroupResources."""

    group: str = Field(
        default="", max_length=253, description="API group without version; empty for core."
    )
    resources: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Resources, e.g. pods or pods/log."
    )
    resource_names: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Object names; needs resources."
    )


class PolicyRule(_Spec):
    """audit.k8s.io/v1 PolicyRule."""

    level: Level = Field(description="None, Metadata, Request or RequestResponse.")
    users: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="User names; empty: all."
    )
    user_groups: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Groups; empty: all."
    )
    verbs: list[Name] = Field(
        default_factory=list, max_length=MAX_ITEMS, description="Verbs; empty: all."
    )
    resources: list[GroupResources] = Field(
        default_factory=list, max_length=16, description="Resources; empty: all."
    )
    namespaces: list[Namespace] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description='Namespaces; empty: all; "" matches cluster-scoped resources.',
    )
    non_resource_urls: list[Url] = Field(
        default_factory=list,
        max_length=32,
        alias="nonResourceURLs",
        description="Non-resource URL paths such as /healthz; '*' only as the last character.",
    )
    omit_stages: list[Stage] = Field(
        default_factory=list, max_length=4, description="Stages not logged for this rule."
    )
    omit_managed_fields: bool | None = Field(
        default=None, description="Drop managedFields from logged bodies."
    )


class AuditPolicySpec(_Spec):
    """One slice of the node's audit policy; slices are joined in (priority, name) order."""

    priority: int = Field(default=100, description="Lower comes first; ties broken by name.")
    omit_stages: list[Stage] = Field(
        default_factory=list,
        max_length=4,
        description="Stages omitted for every rule of this object.",
    )
    omit_managed_fields: bool | None = Field(
        default=None, description="Default omitManagedFields for every rule of this object."
    )
    rules: list[PolicyRule] = Field(
        min_length=1, max_length=256, description="Rules; the first matching rule wins."
    )


@dataclass(frozen=True, slots=True)
class Meta:
    """The parts of metadata the core needs."""

    name: str
    uid: str = ""
    generation: int = 0
    creation_timestamp: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditUser:
    meta: Meta
    spec: AuditUserSpec

    @property
    def ref(self) -> str:
        return f"{AUDIT_USER}/{self.meta.name}"

    @property
    def username(self) -> str:
        return self.spec.username if self.spec.username is not None else self.meta.name

    @property
    def expires(self) -> datetime | None:
        return parse_rfc3339(self.spec.expires_at) if self.spec.expires_at else None

    @property
    def uid(self) -> str:
        return self.spec.uid if self.spec.uid is not None else self.username


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    meta: Meta
    spec: AuditPolicySpec

    @property
    def ref(self) -> str:
        return f"{AUDIT_POLICY}/{self.meta.name}"


@dataclass(frozen=True, slots=True)
class SecretData:
    """A Secret's decoded data (key -> bytes), and the one label kube-audit reads."""

    namespace: str
    name: str
    data: Mapping[str, bytes]
    token_for: str | None = None

    @property
    def ref(self) -> str:
        return f"Secret {self.namespace}/{self.name}"


def _field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part
    return path


# pydantic's error types in the words kubectl users read (a JSON/YAML type, not Python's);
# ``{...}`` are filled from the error's context.
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "too_short": "needs at least {min_length} item(s), has {actual_length}",
    "too_long": "takes at most {max_length} item(s), has {actual_length}",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "string_pattern_mismatch": "does not match {pattern}",
}


def _message(item: Mapping[str, Any]) -> str:
    kind = item["type"]
    context = item.get("ctx") or {}
    if kind in _TYPE_NAMES:
        got = item.get("input")
        return f"must be {_TYPE_NAMES[kind]}, not {_json_type(got)}"
    if kind == "literal_error":
        return f"unsupported value {item['input']!r}; expected one of {context.get('expected')}"
    if kind in _MESSAGES:
        try:
            return _MESSAGES[kind].format(**context)
        except (KeyError, IndexError):
            return _MESSAGES[kind].split(" {", 1)[0]
    if kind == "value_error":
        return str(context.get("error") or item["msg"].removeprefix("Value error, "))
    return str(item["msg"])


def _json_type(value: Any) -> str:
    """The name a YAML/JSON author knows for the value given."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def problems_from_validation(obj: str, prefix: str, error: ValidationError) -> list[Problem]:
    """Turn pydantic's errors into problems with Kubernetes-style field paths and wording a
    YAML author understands (no pydantic or Python terms reach the user)."""
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function")))
        problems.append(Problem(obj, _field_path(prefix, loc), _message(item)))
    return problems


# RFC 1123 subdomain, as Kubernetes checks object names and API groups (length checked apart).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
# A namespace's name (RFC 1123 label): lower-case letters, digits and '-', at most 63.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _meta(obj: Mapping[str, Any], ref_kind: str) -> tuple[Meta, list[Problem]]:
    raw = obj.get("metadata")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        return Meta(name=""), [Problem(f"{ref_kind}/?", "metadata.name", "is required")]
    if len(raw["name"]) > 240 or not DNS_SUBDOMAIN.match(raw["name"]):
        return Meta(name=""), [
            Problem(
                f"{ref_kind}/{raw['name']}",
                "metadata.name",
                "must be a lower-case DNS subdomain of at most 240 characters",
            )
        ]
    annotations = raw.get("annotations") or {}
    generation = raw.get("generation") or 0
    return (
        Meta(
            name=raw["name"],
            uid=str(raw.get("uid") or ""),
            generation=generation if isinstance(generation, int) else 0,
            creation_timestamp=str(raw.get("creationTimestamp") or ""),
            annotations={str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, Mapping)
            else {},
        ),
        [],
    )


_Model = TypeVar("_Model", bound=BaseModel)


@dataclass(frozen=True)
class Kept:
    """Which items of each list field survived in a partly valid object, so that a problem the
    later checks find on it names the item's index in the input (``spec.groups[3]``)."""

    items: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def original(self, problem: Problem, prefix: str) -> Problem:
        for name, kept in self.items.items():
            head = f"{prefix}.{name}["
            if problem.field.startswith(head):
                index, _, tail = problem.field[len(head) :].partition("]")
                if index.isdigit() and int(index) < len(kept):
                    return replace(problem, field=f"{head}{kept[int(index)]}]{tail}")
        return problem


def validate_rest(
    model: type[_Model], data: Any, error: ValidationError, fill: Mapping[str, Any] | None = None
) -> tuple[_Model, Kept] | None:
    """The object without the fields and list items pydantic refused (``fill`` stands in for
    required fields), so the checks that need a whole object still run on the rest and every
    error of an object is shown at once. None when even that does not validate."""
    if not isinstance(data, Mapping):
        return None
    fields: set[str] = set()
    items: dict[str, set[int]] = {}
    for item in error.errors():
        loc = item["loc"]
        if not loc:
            continue
        name = str(loc[0])
        if len(loc) > 1 and isinstance(loc[1], int) and isinstance(data.get(name), list):
            items.setdefault(name, set()).add(loc[1])
        else:
            fields.add(name)
    rest = {k: v for k, v in data.items() if k not in fields}
    kept: dict[str, tuple[int, ...]] = {}
    for name, refused in items.items():
        if name not in fields:
            kept[name] = tuple(i for i in range(len(data[name])) if i not in refused)
            rest[name] = [data[name][i] for i in kept[name]]
    rest.update({k: v for k, v in (fill or {}).items() if k in fields})
    try:
        return model.model_validate(rest, by_alias=True), Kept(kept)
    except ValidationError:
        return None


@dataclass(frozen=True)
class PartialUser:
    """An AuditUser whose spec has errors, without the refused fields and items: never
    rendered, but its identity is checked too (``plan_desired``)."""

    user: AuditUser
    kept: Kept


def _created(timestamp: str) -> datetime | None:
    try:
        return parse_rfc3339(timestamp) if timestamp else None
    except ValueError:
        return None


def parse_audit_user(obj: Mapping[str, Any]) -> AuditUser:
    """Validate an AuditUser object (a dict as the API returns it).

    When the spec has errors, ``InvalidInput.partial`` is a ``PartialUser`` for the identity
    checks that need the operator's settings.
    """
    meta, problems = _meta(obj, AUDIT_USER)
    if problems:
        raise InvalidInput(problems)
    data = obj.get("spec") or {}
    try:
        spec = AuditUserSpec.model_validate(data, by_alias=True)
    except ValidationError as error:
        invalid = InvalidInput(problems_from_validation(f"{AUDIT_USER}/{meta.name}", "spec", error))
        rest = validate_rest(AuditUserSpec, data, error)
        if rest is not None:
            invalid.partial = PartialUser(AuditUser(meta, rest[0]), rest[1])
        raise invalid from None
    user = AuditUser(meta, spec)
    created = _created(meta.creation_timestamp)
    if user.expires and created and user.expires <= created:
        raise InvalidInput([Problem(user.ref, "spec.expiresAt", (
            f"{spec.expires_at} is not after the object was created "
            f"({meta.creation_timestamp}): the token would never work; give a later time, "
            "or set spec.disabled"))])  # fmt: skip
    return user


def parse_secret(obj: Mapping[str, Any]) -> SecretData:
    """Decode a v1 Secret's ``data`` (base64) and ``stringData`` (as kubectl would merge them)."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    name = meta.get("name")
    namespace = meta.get("namespace") or "default"
    ref = f"Secret/{namespace}/{name or '?'}"
    if not isinstance(name, str) or not name:
        raise InvalidInput([Problem(ref, "metadata.name", "is required")])
    data: dict[str, bytes] = {}
    problems = []
    for key, value in (obj.get("data") or {}).items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            problems.append(Problem(ref, f"data.{key}", "is not valid base64"))
    for key, value in (obj.get("stringData") or {}).items():
        data[str(key)] = str(value).encode()
    if problems:
        raise InvalidInput(problems)
    labels = meta.get("labels") if isinstance(meta.get("labels"), Mapping) else {}
    assert isinstance(labels, Mapping)
    token_for = labels.get(TOKEN_FOR_LABEL)
    return SecretData(
        namespace=str(namespace),
        name=name,
        data=data,
        token_for=str(token_for) if token_for is not None else None,
    )
