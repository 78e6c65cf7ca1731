"""The docs say what the code does: every setting any `--help` names is in docs/settings.md,
every exit code in its table; the README leads with the user's path."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from kube_audit import errors
from kube_audit.cli import build_parser
from kube_audit.cli.node import PLAN_CHANGES, PLAN_INVALID

REPO = Path(__file__).resolve().parents[2]
SETTINGS = (REPO / "docs/settings.md").read_text()


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_environment_variable_a_help_names_is_documented() -> None:
    named: dict[str, set[str]] = {}
    for prog, parser in _parsers(build_parser()):
        for var in re.findall(r"\$([A-Z][A-Z0-9_]+)", parser.format_help()):
            named.setdefault(var, set()).add(prog)
    assert "KUBE_AUDIT_KUBELET_CONFIG" in named and "KUBE_AUDIT_REQUEST_TIMEOUT" in named
    missing = {var: progs for var, progs in named.items() if f"`{var}`" not in SETTINGS}
    assert not missing, f"named by --help, not in docs/settings.md: {missing}"


def test_every_operator_flag_is_documented() -> None:
    (operator,) = [p for prog, p in _parsers(build_parser()) if prog == "kube-audit operator"]
    flags = {
        option
        for action in operator._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert "--allow-system-user" in flags
    missing = sorted(f for f in flags if f"`{f}`" not in SETTINGS)
    assert not missing, f"operator flags not in docs/settings.md: {missing}"


def test_every_exit_code_is_in_the_table() -> None:
    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {cls.exit_code for cls in [errors.KubeAuditError, *subclasses(errors.KubeAuditError)]}
    codes |= {0, PLAN_CHANGES, PLAN_INVALID, 130, 141}
    documented = {int(n) for n in re.findall(r"^\| (\d+) \|", SETTINGS, re.MULTILINE)}
    assert codes <= documented, f"exit codes not in docs/settings.md: {codes - documented}"


def test_install_doc_hands_out_kubeconfigs_with_the_command() -> None:
    install = (REPO / "docs/install.md").read_text()
    assert "kube-audit kubeconfig alice" in install
    assert "kubectl config set-credentials" not in install


def test_readme_leads_with_the_users_path() -> None:
    readme = (REPO / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    order = [next(i for i, h in enumerate(headings) if h.startswith(w)) for w in
             ("Install", "Examples", "Who did it", "Develop")]  # fmt: skip
    assert order == sorted(order), headings
    develop = readme[readme.index("## Develop") :]
    assert "make demo" in develop and "make test" in develop
    assert "What `make test` installs and leaves" in develop
    assert "tests/realnode" not in readme.split("## Develop")[0]
    assert (REPO / "docs/testing.md").is_file()


def _exported(registry: object) -> set[str]:
    """The names Prometheus scrapes: a counter's with ``_total``."""
    names = set()
    for family in registry.collect():  # type: ignore[attr-defined]
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_every_metric_the_code_exports_is_in_docs_settings() -> None:
    """Issue 37: the metrics reference is held to the code: the operator's, the authn-webhook's
    and the shipper's registries, as they are built, each name in docs/settings.md."""
    from kube_audit.agent.ship import ShipMetrics  # noqa: PLC0415
    from kube_audit.agent.webhook_sources import WebhookMetrics  # noqa: PLC0415
    from kube_audit.controller.metrics import Metrics  # noqa: PLC0415

    exported = set()
    for metrics in (Metrics(), WebhookMetrics(), ShipMetrics()):
        exported |= _exported(metrics.registry)
    assert len(exported) >= 25
    missing = sorted(name for name in exported if f"`{name}" not in SETTINGS)
    assert not missing, f"exported, not in docs/settings.md: {missing}"
    documented = set(re.findall(r"`(kube_audit_[a-z_]+)", SETTINGS))
    assert not documented - exported, f"documented, exported by nothing: {documented - exported}"


def test_every_port_the_pod_listens_on_is_in_the_ports_table() -> None:
    from kube_audit.constants import AUTHN_WEBHOOK_PORT, SHIP_METRICS_PORT  # noqa: PLC0415

    table = SETTINGS.split("## Ports", 1)[1].split("\n## ", 1)[0]
    daemonset = (REPO / "deploy/daemonset.yaml").read_text()
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d{4,5})", daemonset)}
    ports |= {int(p) for p in re.findall(r"port: (\d{4,5})", daemonset)}
    ports |= {int(p) for p in re.findall(r'_PORT\n\s+value: "(\d{4,5})"', daemonset)}
    ports |= {AUTHN_WEBHOOK_PORT, SHIP_METRICS_PORT}
    assert ports >= {6441, 10281, 10282, 10283, 10284}
    missing = sorted(p for p in ports if f"| {p} |" not in table)
    assert not missing, f"listened on, not in the ports table: {missing}"


def test_every_page_is_in_the_docs_index_and_every_link_resolves() -> None:
    index = (REPO / "docs/README.md").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md")
    assert [p for p in pages if f"]({p})" not in index] == [], "pages missing from docs/README.md"
    broken = []
    for page in [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


# A measured figure: a decimal or a range with a unit, a rate, a size in KiB, or an RSS. Round
# numbers with a unit are mostly settings (100 MB rotation, 10 s TTL) and are not matched.
MEASURED = re.compile(
    r"(?<![\w.,-])("
    r"\d[\d,]*\.\d+(?:-\d[\d,]*\.\d+)? ?(?:ms|s|MB|MiB|minutes)"
    r"|\d+-\d+ ?(?:s|MB|MiB)"
    r"|\d[\d,]* (?:events/s|per second)"
    r"|\d,\d{3} KiB"
    r"|\d+ MB RSS"
    r")(?!\w)"
)
# Settings that read like measurements.
NOT_MEASURED = {"0.5 s"}


def test_every_measured_figure_quoted_is_on_the_benchmarks_page() -> None:
    """Issue 37: one place for every figure (docs/benchmarks.md, with its command and date);
    a page that quotes one links there and quotes it as that page says, so two pages can no
    longer disagree."""
    bench = (REPO / "docs/benchmarks.md").read_text()
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    stray: list[str] = []
    unlinked: list[str] = []
    for page in pages:
        if page.name in ("benchmarks.md", "settings.md"):
            continue
        text = page.read_text()
        figures = set(MEASURED.findall(text)) - NOT_MEASURED
        stray += [f"{page.name}: {figure}" for figure in sorted(figures) if figure not in bench]
        if figures and "benchmarks.md" not in text:
            unlinked.append(page.name)
    assert stray == [], "figures not on docs/benchmarks.md (measure, then add them there)"
    assert unlinked == [], "pages quoting figures without a link to docs/benchmarks.md"
    assert MEASURED.findall("p50 0.39 ms, 41,698 events/s, 86-101 MiB, 57 MB RSS") == [
        "0.39 ms", "41,698 events/s", "86-101 MiB", "57 MB RSS"
    ]  # fmt: skip
