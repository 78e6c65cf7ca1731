"""``kube-audit``: the command line. One module per command family; this one builds the parser
and maps errors to exit codes (1 invalid input, 3 manifest, 4 host, 5 rolled back, 6 cluster).
No input, flag or environment variable ends in a Python traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kube_audit import __version__
from kube_audit.cli import cluster, node, operator, render, who
from kube_audit.errors import InvalidInput, KubeAuditError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kube-audit",
        description="Per-person identities and audit logging for kubeadm clusters.",
    )
    parser.add_argument("--version", action="version", version=f"kube-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    render.add_parsers(sub)
    node.add_parsers(sub)
    operator.add_parser(sub)
    who.add_parser(sub)
    cluster.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        if not args_in:
            parser.print_help()  # as kubectl: no command, the help
            return 0
        args = parser.parse_args(args_in)
        code: int = args.func(args)
        return code
    except InvalidInput as error:
        print(
            f"kube-audit: {len(error.problems)} invalid input(s), nothing written:", file=sys.stderr
        )
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
