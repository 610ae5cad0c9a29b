"""Entry point of the ``shardnet`` command: one subcommand per module of this package.

Each subcommand module has ``register(subparsers)``, which adds its parser and
sets ``handler`` to a function taking the parsed arguments and returning an
exit code.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import logging
import os
import sys
from typing import Optional, Sequence

from shardnet.cli import demo, deploy, head, k8s, send, status, worker
from shardnet.errors import ShardnetError
from shardnet.version import installed_version

SUBCOMMANDS = (worker, head, deploy, send, status, demo, k8s)


def build_parser() -> argparse.ArgumentParser:
    """The ``shardnet`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="shardnet", description="Serve sharded, replicated gRPC services.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def _say_where_on_a_crash() -> None:
    """A process dying of a fatal signal (a fault in gRPC's C core, say) prints every thread's Python stack to
    stderr, its log, instead of vanishing without a word; where stderr is no file (a test capturing it), nothing."""
    try:
        stderr = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return
    faulthandler.enable(file=stderr, all_threads=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the subcommand ``argv`` names (default: ``sys.argv[1:]``) and return its exit code."""
    _say_where_on_a_crash()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except ShardnetError as exc:
        print(f"shardnet {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 141


if __name__ == "__main__":
    sys.exit(main())
