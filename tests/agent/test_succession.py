"""A surge update runs the node's old and new pod side by side for a moment: the new operator
and ship processes start nothing until the old ones have ended (their lock, their ports)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from kube_audit.agent.succession import endpoint, wait_for_node


def _in_thread(lock: Path, ports: list[tuple[str, int] | None], stop: threading.Event) -> list:  # type: ignore[type-arg]
    got: list[int | None] = []
    thread = threading.Thread(
        target=lambda: got.append(wait_for_node(lock, ports, "test", stop.wait)), daemon=True
    )
    thread.start()
    return [thread, got]


def test_the_next_process_waits_for_the_lock_the_previous_one_holds_to_its_end(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "state" / "operator.lock"
    first = wait_for_node(lock, [], "old", threading.Event().wait)
    assert first is not None
    thread, got = _in_thread(lock, [], threading.Event())
    time.sleep(1.2)
    assert thread.is_alive() and not got, "two holders at once"
    os.close(first)  # what the kernel does when the old process ends, however it ends
    thread.join(5)
    assert got and got[0] is not None
    os.close(got[0])


def test_a_port_another_process_listens_on_is_waited_for(tmp_path: Path) -> None:
    """A pod of 0.2.0 holds no lock, but its ports: the new one waits for those too."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    thread, got = _in_thread(tmp_path / "lock", [None, ("127.0.0.1", port)], threading.Event())
    time.sleep(1.2)
    assert thread.is_alive() and not got
    holder.close()
    thread.join(5)
    assert got and got[0] is not None
    os.close(got[0])


def test_a_signal_while_waiting_gives_up(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    first = wait_for_node(lock, [], "old", threading.Event().wait)
    assert first is not None
    stop = threading.Event()
    thread, got = _in_thread(lock, [], stop)
    stop.set()
    thread.join(5)
    assert got == [None]
    os.close(first)


def test_endpoints_name_their_address() -> None:
    assert endpoint("http://127.0.0.1:10283/readyz") == ("127.0.0.1", 10283)
    assert endpoint("") is None and endpoint(None) is None
