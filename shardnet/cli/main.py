"""Entry point of the ``shardnet`` command: one subcommand per module of this package.

Each subcommand module has ``register(subparsers)``, which adds its parser and
sets ``handler`` to a function taking the parsed arguments and returning an
exit code.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import io
import os
import sys
from typing import Optional, Sequence

from shardnet.cli import demo, deploy, head, k8s, send, status, worker
from shardnet.cli.stopping import StoppedBySignal, watch_the_exit
from shardnet.errors import ShardnetError
from shardnet.runtimes import log_lines
from shardnet.runtimes.processes import LOG_LEVELS
from shardnet.version import installed_version

SUBCOMMANDS = (worker, head, deploy, send, status, demo, k8s)


class _Parser(argparse.ArgumentParser):
    """A parser of this command line: flags spelled out (``--shard`` is a typo, not ``--shard-id``), and
    ``--log-level`` taken after a subcommand as well as before it. The subcommands' parsers are of this class
    too (argparse makes them of their parent's), and each names itself, so that an argument none of them
    takes is refused with the usage of the subcommand it was given to."""

    def __init__(self, *, log_level: str = argparse.SUPPRESS, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.add_argument(
            "--log-level", default=log_level, choices=LOG_LEVELS, help="how much to log (default: INFO)"
        )
        self.set_defaults(parser=self)


def build_parser() -> argparse.ArgumentParser:
    """The ``shardnet`` parser with every subcommand registered."""
    parser = _Parser(prog="shardnet", description="Serve sharded, replicated gRPC services.", log_level="INFO")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    # not required here: main() says so itself, after any flag it does not know ("--verison" is a typo, not a
    # missing command)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def said_by(args: argparse.Namespace) -> str:
    """Which process writes this command's log lines: the subcommand, and the name its ``process_name`` (where
    it sets one) gives it: ``head enc``, ``worker enc/shard-0/rep-1``, ``deploy enc``, ``send``."""
    name = args.process_name(args) if "process_name" in args else None
    return f"{args.command} {name}" if name else args.command


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:  # argparse exits (2 for a flag refused, 0 for --help and --version): a caller of main() gets the code
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}" if unknown else
                         "the following arguments are required: COMMAND")
        if unknown:  # refused by the (sub)command they were given to, with its usage
            given_before = set(argv[: argv.index(args.command)])  # before the subcommand: shardnet's own
            refusing = parser if given_before.intersection(unknown) else args.parser
            refusing.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    log_lines.configure(args.log_level, said_by(args))
    try:
        code = int(args.handler(args) or 0)
        if sys.stdout is not None:  # None: started with it closed (>&-), and print() wrote nothing
            sys.stdout.flush()  # here, where a failure is said in a line: at the exit, a traceback or code 120
        return code
    except ShardnetError as exc:
        # "shardnet k8s render: ...", what a server said in it unable to drive the terminal (its lines kept)
        print(log_lines.printable(f"{args.parser.prog}: {exc}", keep="\n"), file=sys.stderr)
        return 2
    except StoppedBySignal as exc:  # stopped in order by SIGTERM, SIGHUP or Ctrl-C
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 141
    except OSError as exc:  # the output could not be written (a full disk, /dev/full, an I/O error)
        if exc.errno not in _UNWRITABLE:
            raise
        print(f"{args.parser.prog}: cannot write its output: {exc.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return OUTPUT_FAILED


# the output could not be written: not one of status's answers (1 not serving, 2 unreachable, 3 degraded), nor
# send's ERROR (1): sysexits' EX_IOERR
OUTPUT_FAILED = 74
_UNWRITABLE = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG})


def program() -> None:
    """The ``shardnet`` program (``python -m shardnet``, the console script): ``main``, then an exit that a
    thread left running cannot hold for ever (``watch_the_exit``). ``main`` itself returns to its caller."""
    code = main()
    watch_the_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    program()
