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
from engine.malloc import tune_malloc
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


def _start_warm_child(argv: Sequence[str]) -> None:
    """``fedlog server --preload MODULE``: start the child that imports MODULE (torch) first.

    The first round waits for that child; started here, before the server's own stack
    is imported (the parser already imports uvicorn), its import overlaps the server's
    instead of following it. ``cmd_server`` starts it if this did not (a flag spelled
    another way argparse accepts), so this is only about when.
    """
    if not argv or argv[0] != "server":
        return
    modules = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--preload"]
    modules += [a.split("=", 1)[1] for a in argv if a.startswith("--preload=")]
    if modules:
        from engine.workflows.warm import prewarm

        prewarm(modules)


#: what ``numpy_defaults`` sets (environment variable -> value) unless the user set it
NUMPY_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1", "NUMPY_MADVISE_HUGEPAGE": "0"}


def numpy_defaults(argv: Sequence[str]) -> None:
    """Set numpy's defaults for fedlog's own work in this process and its children, unless the user chose.

    - ``OPENBLAS_NUM_THREADS=1``: OpenBLAS starts a thread per core when numpy is
      imported, and those threads spin waiting for work before they sleep: ~0.1 CPU-s
      per process at start-up on a 2-core machine, taken from the imports the first
      round waits for (torch imports numpy). fedlog's own numeric code never calls BLAS
      (the server's means are element-wise), and on one machine (``fedlog simulate``, a
      client process serving several sites as threads) a BLAS pool per site would only
      oversubscribe the cores.
    - ``NUMPY_MADVISE_HUGEPAGE=0``: numpy asks for transparent huge pages for every
      array of 4 MiB or more. The server's arrays are a round's results and their mean,
      filled once and let go when the round ends, so each huge page is a fresh 2 MiB
      fault (zeroed, and on a virtual machine backed by the host) for one pass over it:
      reading 4 results of 34 MiB back took 0.11-0.94 s with them and 0.05-0.14 s
      without, in the same process.

    A client process serving one site keeps numpy's defaults, for executors that use
    numpy's BLAS or big long-lived arrays. A variable set in the environment always wins.
    """
    if argv and argv[0] == "client" and sum(1 for a in argv if a == "--identity" or a.startswith("--identity=")) < 2:
        return
    for name, value in NUMPY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedlog`` with ``argv``; return the process exit status."""
    given = sys.argv[1:] if argv is None else argv
    if argv is None:  # a process of its own (not a call from a test or a program)
        numpy_defaults(given)
        if given and given[0] == "client":
            tune_malloc()  # where executors train (see engine/malloc.py)
    _start_warm_child(given)
    with importing():
        parser = build_parser(given)
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
