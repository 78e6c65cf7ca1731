"""deploy/monitoring's alerts: valid PromQL (the Prometheus parser's grammar, via promql-parser),
naming only metrics the code exports, each explained in docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser
import yaml

from kube_audit.agent.ship import ShipMetrics
from kube_audit.agent.webhook_sources import WebhookMetrics
from kube_audit.controller.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


def _exported() -> set[str]:
    names = set()
    for metrics in (Metrics(), WebhookMetrics(), ShipMetrics()):
        for family in metrics.registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_every_alert_is_valid_promql_on_exported_metrics_and_documented() -> None:
    rule = yaml.safe_load((REPO / "deploy/monitoring/prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    operations = (REPO / "docs/operations.md").read_text()
    exported = _exported()
    used = set()
    for alert in alerts:
        promql_parser.parse(alert["expr"])  # raises on a syntax error
        names = set(re.findall(r"\bkube_audit_[a-z_]+", alert["expr"]))
        assert names and names <= exported, (alert["alert"], names - exported)
        used |= names
        assert alert["labels"]["severity"] in ("critical", "warning", "info")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert f"`{alert['alert']}`" in operations, f"{alert['alert']} not in docs/operations.md"
    # The list: a node Blocked, a rollout failing, the snapshot stale, shipping lag.
    assert {"kube_audit_node_blocked", "kube_audit_rollbacks_total",
            "kube_audit_authn_snapshot_age_seconds",
            "kube_audit_ship_last_success_timestamp_seconds"} <= used  # fmt: skip


def test_every_status_reason_is_explained() -> None:
    from kube_audit.core import status  # noqa: PLC0415

    reasons = {status.APPLIED, status.INVALID, status.PENDING, status.ROLLED_BACK,
               status.BLOCKED, status.EXPIRED, status.STALE, "Progressing"}  # fmt: skip
    operations = (REPO / "docs/operations.md").read_text()
    assert [r for r in sorted(reasons) if f"| `{r}` |" not in operations] == []
