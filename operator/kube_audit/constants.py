"""Every name kube-audit shares with the cluster, in one place: API group and kinds, labels,
annotations, Lease names. Changing one here changes it everywhere, CRDs and RBAC excepted
(``make crds`` regenerates the CRDs; ``deploy/`` names the resources in plain YAML)."""

from __future__ import annotations

GROUP = "kube-audit.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

AUDIT_USER = "AuditUser"
AUDIT_POLICY = "AuditPolicy"
PLURALS = {AUDIT_USER: "auditusers", AUDIT_POLICY: "auditpolicies"}
SECRETS = "secrets"

# On token Secrets the operator made (it lists its own Secrets by this label).
TOKEN_LABEL = f"{GROUP}/token"
# On a Secret outside the token namespace: the AuditUser allowed to use it as its token.
TOKEN_FOR_LABEL = f"{GROUP}/token-for"
# On an AuditUser: a new value asks for a new token; the Secret records the value it served.
ROTATE_ANNOTATION = f"{GROUP}/rotate-token"
ROTATED_FOR = f"{GROUP}/rotated-for"

CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"

# The DaemonSet's pods (deploy/daemonset.yaml) and their one container: `who --cluster` asks them.
OPERATOR_POD_SELECTOR = "app.kubernetes.io/name=kube-audit-operator"
OPERATOR_CONTAINER = "operator"
# The pod's read-only container `who --cluster` execs into: the node's audit folder read-only,
# no ServiceAccount token, its own memory limit (never the operator's host write mounts).
WHO_CONTAINER = "who"
DEFAULT_INSTALL_NAMESPACE = "kube-audit"
# On each event `who --cluster -o json` prints: the control-plane node whose apiserver wrote it.
WHO_NODE_ANNOTATION = f"{GROUP}/node"
# How many requests `who` holds back to order its answer, and how far the log must have moved
# past a request before it is printed (its later stages are logged within this time unless it
# runs longer, a watch): the same for files and the store, so both answer alike.
WHO_WINDOW = 20_000
WHO_LAG_SECONDS = 60.0
# The audit store (VictoriaLogs): the fields vlagent adds to each event, both stream fields.
STORE_NODE_FIELD = "node"
STORE_CLUSTER_FIELD = "cluster"
# The VictoriaLogs component's ConfigMap in the install namespace: `url` where the ship container
# sends, `query-url` (else `url`) where `who --cluster` asks, through the API server's service
# proxy when it names a Service (http://NAME.NAMESPACE.svc:PORT).
STORE_CONFIGMAP = "kube-audit-store"
# The ship container's metrics (loopback, beside the operator's 10281-10283).
SHIP_METRICS_PORT = 10284

# Webhook mode: kube-apiserver asks https://127.0.0.1:AUTHN_WEBHOOK_PORT/authenticate who holds a
# token (the pod is on the host network; not a port kubeadm's components use).
AUTHN_WEBHOOK_PORT = 6441
AUTHN_WEBHOOK_PATH = "/authenticate"
# The webhook's /healthz names the snapshot it answers from (``snapshot_digest``): the agent
# calls a person live only once the webhook answers with them (an early "unknown" is cached by
# kube-apiserver for the whole TTL).
AUTHN_SNAPSHOT_HEADER = "X-Kube-Audit-Snapshot"
# Every webhook process's health answers carry an ID of its own: at SIGTERM a webhook serves on
# until another ID answers on its port (the node's next pod, during a surge update).
AUTHN_INSTANCE_HEADER = "X-Kube-Audit-Instance"
# Held by the node's operator and ship processes for their whole life (flock), under the state
# folder: the node's next pod, started beside the old one by a surge update, waits for them.
OPERATOR_LOCK = "operator.lock"
SHIP_LOCK = "ship.lock"
# Beside the identity snapshot: when the operator last confirmed it current (JSON).
AUTHN_CONFIRMATION = "confirmed.json"
# In the token namespace: the cluster's secret that people's token fingerprints are keyed with,
# so the status and audit events show no digest of a token (made once by the operator).
FINGERPRINT_KEY_SECRET = "kube-audit-fingerprint-key"
FINGERPRINT_KEY = "key"
# Beside the identity snapshot: the node's own secret its token digests are keyed with (HMAC).
AUTHN_DIGEST_KEY = "digest.key"
# kubeadm's cluster CA and the client certificate kube-apiserver presents to kubelets: the
# webhook answers only that certificate (host paths; kube-apiserver's flags may name others).
KUBEADM_CLIENT_CA = "/etc/kubernetes/pki/ca.crt"
KUBEADM_APISERVER_CLIENT_CERT = "/etc/kubernetes/pki/apiserver-kubelet-client.crt"
KUBEADM_APISERVER_CLIENT_KEY = "/etc/kubernetes/pki/apiserver-kubelet-client.key"

# One node restarts its apiserver at a time: the holder of this Lease.
ROLLOUT_LEASE = "kube-audit-rollout"
# Config hashes that failed on some node (newest last, comma-separated), on the rollout Lease.
FAILED_ANNOTATION = f"{GROUP}/failed-configs"
# How many failed config hashes a node's state and the rollout Lease remember.
KEEP_FAILED = 20
# One pod turns node entries into conditions: the holder of this Lease.
STATUS_LEASE = "kube-audit-status"
# Each node's record (what it runs, its last outcome) is a Lease of this name prefix: one
# object per node instead of the config hash repeated on every AuditUser.
NODE_LEASE_PREFIX = "kube-audit-node-"
NODE_CONFIG_ANNOTATION = f"{GROUP}/config-hash"
NODE_OUTCOME_ANNOTATION = f"{GROUP}/outcome"
NODE_MESSAGE_ANNOTATION = f"{GROUP}/message"
NODE_APPLIED_ANNOTATION = f"{GROUP}/applied-at"
NODE_ROLLBACK_ANNOTATION = f"{GROUP}/rolled-back-at"
# Webhook mode: when this node's operator last confirmed its identity snapshot current.
NODE_CONFIRMED_ANNOTATION = f"{GROUP}/snapshot-confirmed-at"
# With the audit store: this node's ship report (core.ship_report), copied from the ship
# container's file every SHIP_REPORT_SECONDS; a node whose report is older than
# SHIP_STALLED_AFTER is shown stalled on every AuditPolicy (seen within a minute).
NODE_SHIPPING_ANNOTATION = f"{GROUP}/shipping"
SHIP_REPORT_SECONDS = 15.0
SHIP_STALLED_AFTER = 45.0
SHIP_REPORT_FILE = "ship-report.json"

EVENT_NAMESPACE = "default"
# user.extra key kube-apiserver writes into every audit event: which credential made the
# request (the authn-webhook names the token's fingerprint there; x509 and ServiceAccount
# tokens have their own). `who -o wide` shows it.
CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"
