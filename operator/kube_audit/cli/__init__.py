"""``kube-audit``: the command line. One module per command family; this one builds the parser
and maps errors to exit codes (1 invalid input, 3 manifest, 4 host, 5 rolled back, 6 cluster,
7 partial answer).
No input, flag or environment variable ends in a Python traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from kube_audit import __version__
from kube_audit.errors import InvalidInput, KubeAuditError

# Command -> the module that defines it. Only the module of the command given is imported (all
# of them for the overall help), so `who` starts without pydantic or the Kubernetes client.
COMMANDS = {
    "render": "render",
    "crds": "render",
    "grant-secrets": "render",
    "node": "node",
    "operator": "operator",
    "who": "who",
    "standby": "who",
    "ship": "ship",
    "authn-webhook": "authn",
    "kubeconfig": "cluster",
    "status": "cluster",
    "rotate": "cluster",
    "completion": "completion",
}
PROG = "kube-audit"
PLUGIN_PROG = "kubectl audit"


def source_commit() -> str:
    """The commit this copy was built from: recorded in the wheel by setup.py, or asked of git
    in a source checkout (an editable install). Empty when neither says."""
    recorded = resources.files("kube_audit").joinpath("COMMIT")
    if recorded.is_file():
        return recorded.read_text().strip()
    checkout = Path(__file__).resolve().parents[3]
    if not (checkout / "setup.py").is_file() or not (checkout / "operator/kube_audit").is_dir():
        return ""  # an installed copy that records nothing: never another project's HEAD
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def version_text(prog: str = PROG) -> str:
    return f"{prog} {__version__} (commit {source_commit()[:12] or 'unknown'})"


class _VersionAction(argparse.Action):
    """argparse's own prints a fixed string; this one asks for the commit only when used."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and commit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text(parser.prog))
        parser.exit()


def build_parser(command: str | None = None, prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Per-person identities and audit logging for kubeadm clusters.",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.set_defaults(prog_name=prog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"kube_audit.cli.{module}").add_parsers(sub)
    return parser


def _complete(prog: str) -> None:
    """Answer the shell's completion request (argcomplete's protocol), then exit."""
    import argcomplete  # noqa: PLC0415 - only here and in `completion`

    argcomplete.autocomplete(build_parser(None, prog))


def kubectl_plugin() -> int:
    """``kubectl-audit``: kubectl runs it for ``kubectl audit ...`` with the words after it."""
    return main(prog=PLUGIN_PROG)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    if "_ARGCOMPLETE" in os.environ:
        _complete(prog)
    try:
        parser = build_parser(args_in[0] if args_in else None, prog)
        if not args_in:
            parser.print_help()  # as kubectl: no command, the help
            return 0
        args = parser.parse_args(args_in)
        code: int = args.func(args)
        return code
    except InvalidInput as error:
        # Said only by the commands that write: a read-only one has nothing to reassure about.
        written = ", nothing written" if getattr(args, "writes", False) else ""
        print(f"kube-audit: {len(error.problems)} invalid input(s){written}:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return error.exit_code
    except KubeAuditError as error:
        print(f"kube-audit: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`kube-audit who | head`): stop quietly, as grep and cat do;
        # stdout goes to /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
