"""``kube-audit who`` over real files: rotation, gzip, corrupt lines, one result per request."""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube_audit import hostfs
from kube_audit.cli import main
from kube_audit.core.audit_query import GrowingTable, Query, parse_duration
from kube_audit.who.files import run_who
from tests.auditlog import generate


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "var/log/kubernetes/audit"
    folder.mkdir(parents=True)
    lines = list(generate(3000))
    third = len(lines) // 3
    with gzip.open(folder / "audit-2026-11-01T00-10-00.000.log.gz", "wb") as fh:
        fh.writelines(lines[:third])
    (folder / "audit-2026-11-01T00-20-00.000.log").write_bytes(b"".join(lines[third : 2 * third]))
    cut = b'{"kind":"Event","user":{"username":"alice"},"verb":"create","objectRef":{"resource":"services"'
    (folder / "audit.log").write_bytes(b"".join(lines[2 * third :]) + cut)
    return folder


def _all_events(folder: Path) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for path in sorted(folder.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            for line in fh:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    return out


def test_json_output_one_per_request_latest_stage(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "who",
                str(log_dir),
                "--user",
                "alice",
                "--verb",
                "create",
                "--resource",
                "svc",
                "-o",
                "json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    expected = {
        e["auditID"]
        for e in _all_events(log_dir)
        if e["user"]["username"] == "alice"
        and e["verb"] == "create"
        and e["objectRef"]["resource"] == "services"
    }
    assert {r["auditID"] for r in results} == expected and len(results) == len(expected) > 0
    times = [r["requestReceivedTimestamp"] for r in results]
    assert times == sorted(times), "newest last"
    stages = {r["auditID"]: r["stage"] for r in results}
    for e in _all_events(log_dir):
        if e["auditID"] in stages and e["stage"] == "ResponseComplete":
            assert stages[e["auditID"]] == "ResponseComplete"
    assert "skipped 1 corrupt or truncated line" in captured.err


def test_request_seen_only_at_request_received_is_a_result(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = _all_events(log_dir)
    complete = {e["auditID"] for e in events if e["stage"] == "ResponseComplete"}
    only_received = [e for e in events if e["auditID"] not in complete]
    assert only_received
    target = only_received[0]
    main(["who", str(log_dir), "--name", target["objectRef"].get("name", "x"), "-o", "json"])
    ids = {json.loads(line)["auditID"] for line in capsys.readouterr().out.splitlines()}
    assert target["auditID"] in ids or "name" not in target["objectRef"]


def test_table_time_window_and_status(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "who",
            str(log_dir),
            "--status",
            "4xx",
            "--since",
            "2026-11-01T00:01:00Z",
            "--until",
            "2026-11-01T00:05:00Z",
            "-o",
            "wide",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["TIME", "(UTC)", "USER"]
    assert len(out) > 1 and all(" 403 " in line for line in out[1:])
    times = [line[:19] for line in out[1:]]
    assert all("2026-11-01 00:01:00" <= t < "2026-11-01 00:05:00" for t in times)


def test_default_path_is_the_agents_log_folder(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = log_dir.parents[3]
    assert main(["who", "--host-root", str(root), "--user", "carol", "--verb", "delete"]) == 0
    out = capsys.readouterr().out
    assert "carol" in out and "delete" in out


def test_bad_filters_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["who", str(tmp_path), "--since", "yesterday", "--status", "4x"]) == 1
    err = capsys.readouterr().err
    assert "who: --since" in err and "who: --status" in err and "Traceback" not in err
    assert main(["who", str(tmp_path / "missing")]) == 1


def test_window_keeps_memory_bounded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("kube_audit.who.files.WINDOW", 50)
    log = tmp_path / "audit.log"
    log.write_bytes(b"".join(itertools.islice(generate(2000), 4000)))
    assert main(["who", str(log), "-o", "json"]) == 0
    ids = [json.loads(line)["auditID"] for line in capsys.readouterr().out.splitlines()]
    assert len(ids) == len(set(ids)) == 2000


def test_filters_as_people_type_them(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Comma lists are repeated flags; relative times combine units."""
    assert main(["who", str(log_dir), "--verb", "create,delete", "-o", "json"]) == 0
    verbs = {json.loads(line)["verb"] for line in capsys.readouterr().out.splitlines()}
    assert verbs == {"create", "delete"}
    assert main(["who", str(log_dir), "--since", "1h30m", "-o", "json"]) == 0, "1h30m parses"
    capsys.readouterr()
    code = main(["who", str(log_dir), "--since", "2h", "--until", "2026-11-01T00:00:00Z"])
    assert code == 1
    assert "--since" in capsys.readouterr().err


def test_a_folder_without_audit_logs_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "no matching requests in 0 files": the folder is wrong, not the question."""
    assert main(["who", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "holds no audit log files" in err and "Traceback" not in err


def test_a_log_someone_reformatted_is_searched_as_well(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keyed needles (``"verb":"create"``) are used only on compact JSON as the apiserver
    writes it; a log re-written with spaces (``json.dumps``, ``jq .``) is still searched."""
    events = [json.loads(line) for line in generate(400)]
    compact, spaced = tmp_path / "compact", tmp_path / "spaced"
    for folder, dump in ((compact, lambda e: json.dumps(e, separators=(",", ":"))),
                         (spaced, json.dumps)):  # fmt: skip
        folder.mkdir()
        (folder / "audit.log").write_text("".join(dump(e) + "\n" for e in events))
    answers = []
    for folder in (compact, spaced):
        assert main(["who", str(folder), "--verb", "create", "--user", "alice", "-o", "json"]) == 0
        answers.append([json.loads(line)["auditID"] for line in capsys.readouterr().out.split("\n")
                        if line])  # fmt: skip
    assert answers[0] and answers[0] == answers[1]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 30.0), ("30s", 30.0), ("1m", 60.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("500ms", 0.5)],
)
def test_request_timeouts_read_as_kubectl_reads_them(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "1.5", "10x", "1m30", "m", "-5s"])
def test_anything_else_is_not_a_duration(value: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


def test_an_unknown_verb_is_refused_with_the_verbs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["who", str(tmp_path), "--verb", "create,remove"]) == 1
    err = capsys.readouterr().err
    assert "who: --verb: 'remove' is not a verb of an audit event; one of get, list" in err
    assert "deletecollection" in err


@pytest.mark.parametrize(
    "flags",
    [["--operator-namespace", "ops"], ["--request-timeout", "1m"], ["--context", "prod"]],
)
def test_cluster_flags_without_cluster_are_refused(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["who", str(tmp_path), *flags]) == 1
    assert f"{flags[0]}: only used with --cluster" in capsys.readouterr().err


def test_a_bad_request_timeout_is_refused_before_asking_anyone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["who", "--cluster", "--request-timeout", "0"]) == 1
    assert "--request-timeout: '0': must be more than 0" in capsys.readouterr().err
    monkeypatch.setenv("KUBE_AUDIT_REQUEST_TIMEOUT", "soon")
    assert main(["who", "--cluster"]) == 1
    assert "KUBE_AUDIT_REQUEST_TIMEOUT: 'soon' is not a duration" in capsys.readouterr().err


def test_rows_are_printed_as_they_are_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`who | head` answers at once: the first rows reach the output (flushed) while most of
    the log is still unread, and memory does not hold every row."""
    log = tmp_path / "audit.log"
    log.write_bytes(b"".join(generate(3000)))
    events: list[tuple[str, int]] = []
    read_blocks = hostfs.read_blocks

    def small_blocks(path: Path) -> Iterator[bytes]:
        for index, block in enumerate(read_blocks(path, 1 << 16)):
            events.append(("read", index))
            yield block

    class Output(io.StringIO):
        def flush(self) -> None:
            events.append(("flushed", len(self.getvalue().splitlines())))

    monkeypatch.setattr(hostfs, "read_blocks", small_blocks)
    for output in ("table", "json"):
        events.clear()
        out = Output()
        assert run_who([str(log)], Query(), output=output, out=out, err=io.StringIO(),
                       log_file="audit.log") == 0  # fmt: skip
        last_read = max(i for kind, i in events if kind == "read")
        first_rows = next(i for i, (kind, n) in enumerate(events) if kind == "flushed" and n)
        assert first_rows < events.index(("read", last_read // 4)), (
            f"{output}: rows flushed before a quarter of the log was read"
        )
        rows = [json.loads(r) for r in out.getvalue().splitlines()] if output == "json" else []
        times = [r["requestReceivedTimestamp"] for r in rows]
        assert times == sorted(times), "still in request-time order"


def test_table_columns_grow_as_rows_come() -> None:
    table = GrowingTable(["USER", "VERB"])
    assert table.line(["USER", "VERB"]) == "USER" + " " * 22 + "VERB\n"
    assert table.line(["a" * 30, "get"]) == "a" * 30 + "  get\n"
    assert table.line(["bob", "list"]) == "bob" + " " * 29 + "list\n", "the wider column stays"


def test_a_corrupt_gzip_or_a_file_that_is_no_audit_log_is_named_and_skipped(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other files are still answered; the exit status says the answer is partial."""
    gz = log_dir / "audit-2026-11-01T00-10-00.000.log.gz"
    gz.write_bytes(gz.read_bytes()[:-200])
    stranger = log_dir / "audit-2026-11-01T00-05-00.000.log"
    stranger.write_text("hello, this is not JSON\n")
    assert main(["who", str(log_dir), "--user", "alice", "-o", "json"]) == 7
    captured = capsys.readouterr()
    answered = [json.loads(line) for line in captured.out.splitlines()]
    assert answered and all(r["user"]["username"] == "alice" for r in answered)
    assert f"kube-audit: warning: cannot read {gz}: " in captured.err
    assert "the rest of that file is skipped" in captured.err
    assert f"kube-audit: warning: {stranger}: not an audit log" in captured.err
    assert "partial answer: 2 of 4 file(s) could not be read in full" in captured.err
    assert "Traceback" not in captured.err


def test_a_reader_that_goes_away_ends_who_quietly(tmp_path: Path) -> None:
    """`who | head -1`: exit as grep does (141, SIGPIPE's status), no traceback."""
    log = tmp_path / "audit.log"
    log.write_bytes(b"".join(generate(3000)))
    who = f"{sys.executable} -c 'import sys; from kube_audit.cli import main; sys.exit(main())'"
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {who} who {log} -o json | head -1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["auditID"]
    assert done.returncode == 141 and done.stderr == ""
