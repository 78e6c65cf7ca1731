"""The node agent: applies the desired state to one control-plane node's host, safely."""
