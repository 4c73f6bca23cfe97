"""The ``fedlog`` command: a thin shell that parses arguments and calls plain functions.

Each subcommand lives in ``engine/commands/<name>.py`` with a ``register(subparsers)``
that adds its parser and sets ``func``; the functions it calls are importable and
tested directly. Only this entry point configures logging handlers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from engine.errors import EngineError
from engine.startup import importing

__all__ = ["main"]

COMMANDS = ("db", "charts", "replay", "sql", "demo", "provision", "server", "client", "job", "simulate",
            "chunks")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, one sub-parser per command module.

    Given the command line, only the named command's module is imported (a site's or
    the server's process does not pay for importing every other command: ~0.3 s);
    without one (``fedlog --help``, a typo) every command is, for the full help.
    """
    parser = argparse.ArgumentParser(
        prog="fedlog",
        description="Federated learning on an event-sourced state-machine engine.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name in [named] if named in COMMANDS else COMMANDS:
        module = importlib.import_module(f"engine.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedlog`` with ``argv``; return the process exit status."""
    with importing():
        parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = args.func(args)
    except EngineError as exc:
        print(f"fedlog {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedlog {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    if argv is None and getattr(args, "exit_now", False):  # a command-line run that asked to end at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status or 0))
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
