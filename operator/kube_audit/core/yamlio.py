"""YAML in and out with libyaml when present: the pure-Python parser is 10x slower."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

YAMLError = yaml.YAMLError


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=_LOADER)


def load_all(text: str | bytes) -> Iterator[Any]:
    return yaml.load_all(text, Loader=_LOADER)


def dump(doc: Any) -> str:
    """Block style, keys in insertion order, no line folding: kubeadm's own style."""
    return yaml.dump(
        doc,
        Dumper=_DUMPER,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 16,
    )
