"""YAML in and out with libyaml when present: the pure-Python parser is 10x slower.

What we write is read by Go (kubelet and kube-apiserver use sigs.k8s.io/yaml, a YAML 1.1
resolver): a plain ``y``, ``on``, ``1e3`` or ``0o17`` is a boolean or a number there, while
PyYAML (following its own resolver) writes them unquoted. ``dump`` quotes every string that Go
would read as anything but that same string, and leaves all others as PyYAML writes them, so
kubeadm's manifests keep their bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BASE_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

YAMLError = yaml.YAMLError

# go-yaml v2's resolve table: these plain scalars are booleans, null, infinities or NaN.
_GO_WORDS = frozenset(
    [
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON",
        "n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF",
        "~", "null", "Null", "NULL", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF",
        "-.inf", "-.Inf", "-.INF", ".nan", ".NaN", ".NAN", "<<",
    ]
)  # fmt: skip
# After removing '_', strconv.ParseInt/ParseUint with base 0 (0x, 0o, 0b, leading-0 octal).
_GO_INT = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
# go-yaml v2's yamlStyleFloat, checked before strconv.ParseFloat.
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
# go-yaml v2's timestamp layouts all start with a date: 2006-1-2.
_GO_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?")


def go_reads_as_string(value: str) -> bool:
    """Whether Go's YAML 1.1 resolver reads ``value``, written as a plain scalar, as a string."""
    if value in _GO_WORDS or value == "":
        return False
    if value[0] not in "+-.0123456789":
        return True
    plain = value.replace("_", "")
    if value[0] != "." and (_GO_INT.fullmatch(plain) or _GO_TIMESTAMP.fullmatch(value)):
        return False
    return not _GO_FLOAT.fullmatch(plain)


class _GoSafeDumper(_BASE_DUMPER):  # type: ignore[misc, valid-type]
    """PyYAML's safe dumper, with strings Go would misread forced into quotes."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if go_reads_as_string(value):
        return dumper.represent_str(value)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")


_GoSafeDumper.add_representer(str, _represent_str)


def locate(source: str, error: yaml.YAMLError) -> tuple[str, str]:
    """(``FILE:LINE:COLUMN``, why on one line): PyYAML's own text spans lines and names
    ``<unicode string>``."""
    mark = getattr(error, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    why = " ".join(
        str(part).strip()
        for part in (getattr(error, "problem", None), getattr(error, "context", None))
        if part
    )
    return where, why or " ".join(str(error).split())


def explain(source: str, error: yaml.YAMLError) -> str:
    """``FILE:LINE:COLUMN: not valid YAML: why``, as compilers and linters say it."""
    where, why = locate(source, error)
    return f"{where}: not valid YAML: {why}"


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=_LOADER)


def load_all(text: str | bytes) -> Iterator[Any]:
    return yaml.load_all(text, Loader=_LOADER)


def dump(doc: Any) -> str:
    """Block style, keys in insertion order, no line folding: kubeadm's own style."""
    return yaml.dump(
        doc,
        Dumper=_GoSafeDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )
