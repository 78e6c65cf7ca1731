"""``kube-audit completion bash|zsh``: shell completion, as ``kubectl completion`` gives it.

argcomplete does the work (a well-kept library that completes from the argparse parser itself,
so subcommands, flags and choices never drift from ``--help``): the script printed here makes
the shell call ``kube-audit`` back with the words typed, and ``main`` answers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh")


def cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode  # noqa: PLC0415 - only here

    sys.stdout.write(shellcode([args.prog_name], shell=args.shell))
    return 0


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "completion",
        help="print the shell completion script for bash or zsh",
        description="Print the completion script. bash: `source <(kube-audit completion bash)` "
        "(add it to ~/.bashrc); zsh: `source <(kube-audit completion zsh)` (add it to "
        "~/.zshrc, after compinit).",
    )
    cmd.add_argument("shell", choices=SHELLS)
    cmd.set_defaults(func=cmd_completion)
