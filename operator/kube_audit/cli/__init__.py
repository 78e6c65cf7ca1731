"""``kube-audit``: the command line. One module per command family; this one builds the parser
and maps errors to exit codes (1 invalid input, 3 manifest, 4 host, 5 rolled back, 6 cluster,
7 partial answer).
No input, flag or environment variable ends in a Python traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kube_audit import __version__
from kube_audit.errors import InvalidInput, KubeAuditError

# Command -> the module that defines it. Only the module of the command given is imported (all
# of them for the overall help), so `who` starts without pydantic or the Kubernetes client.
COMMANDS = {
    "render": "render",
    "crds": "render",
    "node": "node",
    "operator": "operator",
    "who": "who",
    "kubeconfig": "cluster",
    "status": "cluster",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kube-audit",
        description="Per-person identities and audit logging for kubeadm clusters.",
    )
    parser.add_argument("--version", action="version", version=f"kube-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"kube_audit.cli.{module}").add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        parser = build_parser(args_in[0] if args_in else None)
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


if __name__ == "__main__":
    sys.exit(main())
