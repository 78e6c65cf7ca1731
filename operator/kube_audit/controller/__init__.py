"""The operator: kopf handlers feed a per-node reconciler that drives the node agent."""
