"""``sparsecnn`` command line: parse, call the public API, print. One module per verb.

Each verb module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
handler ``func(args) -> int``. Errors the user can fix arrive as :class:`SparseCNNError` and are
printed as one line on stderr with exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sparsecnn.errors import SparseCNNError

# Verb modules, in the order `sparsecnn --help` lists them.
COMMANDS: tuple[str, ...] = (
    "analyze", "export", "run", "bench", "sweep", "report", "train", "prune", "compress",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecnn",
        description="Does the sparsity in your CNN make it smaller and faster on your hardware?",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sparsecnn.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SparseCNNError as exc:
        print(f"sparsecnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsecnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
