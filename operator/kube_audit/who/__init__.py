"""``kube-audit who``: one question (``core.audit_query.Query``), several places to ask it.

- ``files``: this node's audit log files, read directly;
- ``pods``: every control-plane node's log, through each node's kube-audit pod (pods/exec);
- ``store``: the audit store (VictoriaLogs) the nodes ship their logs to.

Each answers with one row per request at its latest stage, in request-time order.
"""
