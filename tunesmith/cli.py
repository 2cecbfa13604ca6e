"""The `tunesmith` command line: one entry point; the subcommands come from tunesmith/commands/.

User errors (bad config, bad data, missing files) print one paragraph and exit with code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tunesmith.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module (commands.MODULES) adds its own subcommands."""
    from tunesmith.commands import MODULES

    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Fine-tune language models on the hardware you have. Start with `tunesmith demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline-first: never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.run(args)
        return 0
    except UserError as e:
        print(f"tunesmith: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
