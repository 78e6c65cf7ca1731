"""``KubeApi``: every call kube-audit makes, one object for its callers."""

from __future__ import annotations

from kube_audit.kube.events import Events
from kube_audit.kube.leases import Leases
from kube_audit.kube.objects import Objects
from kube_audit.kube.podexec import Exec
from kube_audit.kube.secrets import Secrets
from kube_audit.kube.services import Services
from kube_audit.kube.watches import Watches


class KubeApi(Objects, Secrets, Services, Watches, Exec, Events, Leases):
    """Typed calls for what kube-audit needs; nothing else in the project imports the client.

    Requests are built by the official client's ``ApiClient`` (configuration, credentials and
    their refresh, TLS, proxies) and answered as raw JSON. Not the generated ``CoreV1Api``:
    importing that module alone costs about 20 MB of pydantic signatures, and model objects
    for 10,000 Secrets would cost more memory than the data. Each base is one thing the calls
    talk to (this package's modules); they share one ``Transport``.
    """
