"""The ``vyra-ipc`` command line: its parser and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, TextIO

from .._options import DEFAULT_TIMEOUT
from ..exceptions import IPCError
from . import _verbs

__all__ = ['build_parser', 'main', 'run']

Verb = Callable[[argparse.Namespace, TextIO], int]

_EPILOG = """TARGET is a module name (its socket as clients resolve it: VYRA_IPC_SOCKET,
else /tmp/<module>_ipc.sock) or a socket path. Exit status: 0 done, 1 the call
or server failed, 2 the command is wrong."""


def build_parser(parser: argparse.ArgumentParser | None = None, prog: str = 'vyra-ipc'
                 ) -> argparse.ArgumentParser:
    """The parser of ``vyra-ipc`` (or its verbs added to ``parser``, as
    ``ros2 ipc`` does); each verb sets ``args.verb``."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog=prog, description='See and poke the IPC servers of VYRA modules on this machine.',
            epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(title='commands', metavar='COMMAND')

    def verb(name: str, function: Verb, summary: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=summary, description=summary, epilog=_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(verb=function)
        sub.add_argument('--json', action='store_true', help='machine-readable output')
        return sub

    def target(sub: argparse.ArgumentParser, lane: bool = True) -> None:
        sub.add_argument('target', metavar='TARGET', help='module name or socket path')
        if lane:
            sub.add_argument('--lane', choices=('auto', 'grpc', 'ttrpc'), default='auto',
                             help='the lane to call on (default: auto, the fast lane when it answers)')
            sub.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT,
                             help=f'deadline of each call in seconds (default {DEFAULT_TIMEOUT:g})')

    listing = verb('list', _verbs.list_servers, 'the IPC servers whose sockets are in DIR (default /tmp)')
    listing.add_argument('directories', metavar='DIR', nargs='*')
    describing = verb('describe', _verbs.describe, 'services and methods of a server, or one method and '
                                                   'its messages (from server reflection)')
    target(describing, lane=False)
    describing.add_argument('symbol', metavar='SERVICE[/METHOD]', nargs='?')
    calling = verb('call', _verbs.call, 'call a method: the request as JSON or YAML, the answer as JSON '
                                        '(one document per streamed message)')
    target(calling)
    calling.add_argument('method', metavar='SERVICE/METHOD')
    calling.add_argument('request', metavar='REQUEST', nargs='?', default='{}',
                         help="JSON or YAML (default {}), '-' for stdin, @FILE for a file; "
                              'a list for methods that stream requests')
    calling.add_argument('--metadata', '-m', action='append', default=[], metavar='KEY=VALUE')
    checking = verb('health', _verbs.health, 'the grpc.health.v1 status of a server or one of its services')
    target(checking)
    checking.add_argument('service', metavar='SERVICE', nargs='?', default='')
    pinging = verb('ping', _verbs.ping, 'round-trip times of health checks: p50, p99, max, histogram')
    target(pinging)
    pinging.add_argument('--count', '-c', type=int, default=100, help='calls to make (default 100)')
    stating = verb('stats', _verbs.stats, "the server's metrics: calls, errors, latency, connections, bytes")
    target(stating)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    """Run the verb ``args`` name; errors become one line on ``err`` and the exit status."""
    verb: Verb | None = getattr(args, 'verb', None)
    if verb is None:
        parser.print_help(out)
        return 2
    try:
        return verb(args, out)
    except _verbs.UsageError as error:
        print(f'{parser.prog}: error: {_one_line(str(error))}', file=err)
        return 2
    except IPCError as error:
        print(f'{parser.prog}: {_one_line(_verbs.describe_error(error))}', file=err)
        return 1
    except (OSError, ValueError) as error:
        print(f'{parser.prog}: {_one_line(str(error))}', file=err)
        return 2 if isinstance(error, ValueError) else 1
    except KeyboardInterrupt:
        return 130


def _one_line(message: str) -> str:
    return ' '.join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """``vyra-ipc``'s entry point."""
    parser = build_parser()
    return run(parser.parse_args(argv), parser)
