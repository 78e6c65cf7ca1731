"""``kube-audit authn-webhook``: the TokenReview webhook of webhook mode, as its own process."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import resource
import signal
import threading
from pathlib import Path
from typing import Any

from kube_audit.agent.authn_webhook import MAX_CONNECTIONS, AuthnWebhook, WebhookFiles
from kube_audit.agent.layout import HostLayout
from kube_audit.cli.common import guard_flags, host_flags
from kube_audit.cli.env import env_str
from kube_audit.constants import (
    AUTHN_WEBHOOK_PORT,
    KUBEADM_APISERVER_CLIENT_CERT,
    KUBEADM_CLIENT_CA,
)
from kube_audit.core.identities import Allowed
from kube_audit.core.settings import Settings
from kube_audit.errors import HostError

log = logging.getLogger(__name__)

# How often the serving certificate is looked for before the node agent has written it.
WAIT_POLL = 1.0
# How often the port is tried while a listener that does not share it holds it.
BIND_POLL = 0.1


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:6441")
    return host.strip("[]"), int(port)


def files_of(args: argparse.Namespace) -> WebhookFiles:
    layout = HostLayout.discover(Path(args.host_root), Settings(), args.kubelet_config)
    return WebhookFiles(
        snapshot=layout.identity_snapshot,
        serving_cert=layout.webhook_dir / "serving.crt",
        serving_key=layout.webhook_dir / "serving.key",
        client_ca=layout.host(args.client_ca),
        client_cert=layout.host(args.client_cert),
    )


def _raise_open_files_limit() -> None:
    """Each connection is a descriptor: the soft limit (often 1,024) up to the hard one, so
    the connection cap, not the limit, decides when a crowd is turned away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected seconds, 0 or more (0: never)")
    return seconds


def cmd_authn_webhook(args: argparse.Namespace) -> int:
    """Serve until SIGTERM. Signals are blocked in every thread and waited for here, so one
    arriving at any moment stops the server, never a request half-answered."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    files = files_of(args)
    if not files.serving_cert.exists():
        log.info(
            "waiting for %s: the node agent (the operator container) writes it on its first apply",
            files.serving_cert,
        )
    while not (files.serving_cert.exists() and files.serving_key.exists()):
        early = signal.sigtimedwait(signals, WAIT_POLL)
        if early is not None:
            log.info("%s: stopping", signal.Signals(early.si_signo).name)
            return 0
    _raise_open_files_limit()
    allowed = Allowed(
        frozenset(args.allow_system_user or ()), frozenset(args.allow_system_group or ())
    )
    waited = False
    while True:
        try:
            webhook = AuthnWebhook(
                files, args.listen, refuse_after=args.refuse_after or None, allowed=allowed
            )
            break
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                where = f"{args.listen[0]}:{args.listen[1]}"
                raise HostError(f"cannot listen on {where}: {error}") from None
        # A listener that does not share the port: the node's previous pod of a version
        # before 0.3.0 (it stops at SIGTERM), or another program (said in the log).
        if not waited:
            log.info("waiting for %s:%d, where another process listens", *args.listen)
            waited = True
        early = signal.sigtimedwait(signals, BIND_POLL)
        if early is not None:
            log.info("%s: stopping", signal.Signals(early.si_signo).name)
            return 0
    server = threading.Thread(target=webhook.serve, name="authn-webhook", daemon=True)
    server.start()
    log.info("answering TokenReviews on https://%s:%d", *args.listen)
    received = signal.sigwait(signals)
    log.info(
        "%s: serving on until the node's next webhook answers (at most %.0f s)",
        signal.Signals(received).name,
        args.hand_over,
    )
    webhook.shutdown(hand_over=args.hand_over)
    server.join()
    log.info(
        "stopped" + (f": webhook {webhook.successor} answers now" if webhook.successor else "")
    )
    return 0


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "authn-webhook",
        parents=[host_flags(from_env=True), guard_flags()],
        help="serve kube-apiserver's TokenReviews from this node's identity snapshot",
        description="Webhook mode's authenticator: answers TokenReviews (v1 and v1beta1) from "
        "the identity snapshot the node agent keeps under ROOT/var/lib/kube-audit, only to the "
        "client presenting kube-apiserver's own client certificate; re-reads the snapshot and "
        "the certificates within a second of a change.",
    )
    cmd.add_argument(
        "--listen",
        type=_listen,
        default=env_str("KUBE_AUDIT_AUTHN_LISTEN", f"127.0.0.1:{AUTHN_WEBHOOK_PORT}"),
        metavar="HOST:PORT",
        help=f"where to serve (default 127.0.0.1:{AUTHN_WEBHOOK_PORT}, or "
        "$KUBE_AUDIT_AUTHN_LISTEN)",
    )
    cmd.add_argument(
        "--refuse-after",
        type=_seconds,
        default=env_str("KUBE_AUDIT_AUTHN_REFUSE_AFTER", "0"),
        metavar="SECONDS",
        help="refuse every token once the operator on this node has not confirmed the snapshot "
        "for this long (its container stuck or cut off from the API: a person deleted since "
        "would still be answered); 0: never, the snapshot's age is only reported (default 0, "
        "or $KUBE_AUDIT_AUTHN_REFUSE_AFTER). See docs/identity-modes.md for the trade-off",
    )
    cmd.add_argument(
        "--hand-over",
        type=_seconds,
        default=env_str("KUBE_AUDIT_AUTHN_HAND_OVER", "30"),
        metavar="SECONDS",
        help="at SIGTERM, serve on until the node's next webhook answers on the port (a pod "
        "update starts it beside this one), for at most this long; 0: stop at once (default "
        "30, or $KUBE_AUDIT_AUTHN_HAND_OVER)",
    )
    cmd.add_argument(
        "--client-ca",
        default=KUBEADM_CLIENT_CA,
        metavar="PATH",
        help=f"CA of the client certificate answered, a host path (default {KUBEADM_CLIENT_CA})",
    )
    cmd.add_argument(
        "--client-cert",
        default=KUBEADM_APISERVER_CLIENT_CERT,
        metavar="PATH",
        help="the one client certificate answered: kube-apiserver's, a host path (default "
        f"{KUBEADM_APISERVER_CLIENT_CERT})",
    )
    cmd.set_defaults(func=cmd_authn_webhook)
