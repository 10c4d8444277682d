"""The ``vyra-ipc`` command line: the verbs, the parser, and running a verb
with its errors turned into one line and an exit status."""

from __future__ import annotations

import argparse
from importlib import metadata
import os
import platform
import sys
from typing import Sequence, TextIO, cast

from .._introspection import package_version
from ..exceptions import IPCError
from . import _call, _describe, _health, _list, _ping, _stats
from ._args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, TARGET_HELP, UsageError, Verb
from ._messages import detail_json
from ._output import EscapingStream

__all__ = ['VERBS', 'build_parser', 'main', 'run']

#: Every verb, in the order ``--help`` lists them.
VERBS: dict[str, Verb] = {verb.name: verb for verb in (
    _list.VERB, _describe.VERB, _call.VERB, _health.VERB, _ping.VERB, _stats.VERB)}


def build_parser(prog: str = 'vyra-ipc') -> argparse.ArgumentParser:
    """The parser of ``vyra-ipc``; the chosen verb is ``args.verb``."""
    parser = argparse.ArgumentParser(
        prog=prog, description='See and poke the IPC servers of VYRA modules on this machine.',
        epilog=TARGET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action=_Version,
                        help="show this package's version, and grpcio's, protobuf's and Python's, and exit")
    verbs = parser.add_subparsers(title='commands', metavar='COMMAND')
    for verb in VERBS.values():
        sub = verbs.add_parser(verb.name, help=verb.summary,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(verb=verb)
        verb.describe(sub)
    return parser


def version_line(prog: str) -> str:
    """``vyra-ipc 0.1.0 (grpcio 1.85.1, protobuf 7.36.2, Python 3.11.7)``: what a bug report needs."""
    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return 'not installed'
    return (f'{prog} {package_version() or "(vyra_base_ipc not installed)"} (grpcio {installed("grpcio")}, '
            f'protobuf {installed("protobuf")}, Python {platform.python_version()})')


class _Version(argparse.Action):
    """argparse's ``version`` action, the line made only when asked for (it reads package metadata)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002 (argparse passes help=)
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_line(parser.prog))  # (on stdout, as argparse's own version action)
        parser.exit()


def run(verb: Verb, args: argparse.Namespace, prog: str, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """Run ``verb``; an error becomes one line on ``err`` (``prog: ...``),
    and a line per status detail the server sent with it (gRPC's richer
    error model, as JSON), and the exit status: 1 the call or the server
    failed, 2 the command is wrong, 130 interrupted."""
    # What servers and socket files of other users named is shown, never acted on.
    # (A TextIO in what it does, though not by its base class.)
    out = cast(TextIO, EscapingStream(sys.stdout if out is None else out))
    err = cast(TextIO, EscapingStream(sys.stderr if err is None else err))
    try:
        status = verb.run(args, out)
        # What is still buffered (stdout to a pipe) is written here, not at
        # exit, where a reader that left would give a BrokenPipeError no
        # handler sees: "Exception ignored ..." and exit status 120.
        out.flush()
        return status
    except UsageError as error:
        print(f'{prog}: error: {_one_line(str(error))}', file=err)
        return EXIT_USAGE
    except IPCError as error:
        print(f'{prog}: {error.code.name}: {_one_line(error.details)}', file=err)
        for detail in error.status_details:
            print(f'{prog}: detail: {detail_json(detail)}', file=err)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader left (`| head`): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EXIT_FAILED
    except ValueError as error:  # a target that is no module name or socket path
        print(f'{prog}: error: {_one_line(str(error))}', file=err)
        return EXIT_USAGE
    except OSError as error:
        # Its words without the '[Errno N] ' that str() puts before them.
        text = (str(error) if error.strerror is None else error.strerror if error.filename is None
                else f'{error.filename}: {error.strerror}')
        print(f'{prog}: {_one_line(text)}', file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _one_line(message: str) -> str:
    return ' '.join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """``vyra-ipc``'s entry point: parse ``argv`` (default ``sys.argv``), run the
    verb. Ctrl-C at any point of it gives exit status 130, without a traceback."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verb: Verb | None = getattr(args, 'verb', None)
        if verb is None:
            parser.print_help()
            return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return run(verb, args, parser.prog)
