"""What the verbs share on the command line: the verb record, the target,
lane, timeout and ``--json`` arguments, and the error of a wrong command.

Exit status of every verb: 0 done, 1 the call or the server failed (a
non-OK status, no server, NOT_SERVING), 2 the command itself is wrong
(usage, bad request text, unknown method), as argparse uses 2.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from dataclasses import dataclass
import textwrap
from typing import Callable, Sequence, TextIO

from .._options import DEFAULT_TIMEOUT, MAX_SECONDS, validate_max_message_bytes
from ..ttrpc._messages import checked_metadata

__all__ = ['EXIT_FAILED', 'EXIT_HELP', 'EXIT_INTERRUPTED', 'EXIT_OK', 'EXIT_USAGE', 'HELP_WIDTH',
           'TARGET_HELP', 'UsageError', 'Verb', 'add_json', 'add_lane', 'add_target', 'add_timeout',
           'parse_metadata', 'positive_seconds', 'seconds']

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Ctrl-C: 128 + SIGINT, as shells report it (also in vyra_base_ipc_cli, which imports nothing of this
#: package before its SIGINT handler is in place).
EXIT_INTERRUPTED = 130

#: Columns of help text: argparse's (80 less 2), which a description given
#: raw (RawDescriptionHelpFormatter, for the epilog's lines) must keep to itself.
HELP_WIDTH = 78

#: The end of ``--help`` of a verb without TARGET, and of ``vyra-ipc``'s own.
EXIT_HELP = 'Exit status: 0 done, 1 the call or the server failed, 2 the command is wrong.'
#: The end of ``--help`` of a verb with TARGET.
TARGET_HELP = """TARGET is a module name (its socket as the clients resolve it: VYRA_IPC_SOCKET,
else /tmp/<module>_ipc.sock) or a socket path. Exit status: 0 done, 1 the call
or the server failed, 2 the command is wrong."""


@dataclass(frozen=True)
class Verb:
    """One verb of ``vyra-ipc`` (and of ``ros2 ipc``)."""

    name: str
    #: One line for ``--help``.
    summary: str
    #: Adds the verb's own arguments to its (sub)parser.
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: Runs the verb, writing its output to the stream; returns the exit status.
    run: Callable[[argparse.Namespace, TextIO], int]
    #: The end of its ``--help``: what TARGET is (for the verbs that take one) and the exit status.
    epilog: str = TARGET_HELP

    def describe(self, parser: argparse.ArgumentParser) -> None:
        """Give the verb's (sub)parser its description (the summary, wrapped to
        80 columns as argparse wraps the rest), its epilog and its arguments."""
        parser.description = textwrap.fill(self.summary, HELP_WIDTH)
        parser.epilog = self.epilog
        self.add_arguments(parser)


class UsageError(Exception):
    """Raised when the command cannot be run as given (exit status 2): a
    request that is not JSON/YAML or does not fit its message, an unknown
    service or method, an option value out of range."""


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: machine-readable output."""
    parser.add_argument('--json', action='store_true', help='machine-readable output (JSON)')


def add_target(parser: argparse.ArgumentParser) -> None:
    """The ``TARGET`` positional: a module name or a socket path."""
    parser.add_argument('target', metavar='TARGET', help='module name or socket path')


def add_lane(parser: argparse.ArgumentParser, *, streams: bool = False) -> None:
    """``--lane`` and ``--timeout`` of the verbs that call the server; with
    ``streams``, ``--timeout 0`` is allowed (a streamed answer without deadline)."""
    parser.add_argument('--lane', choices=('auto', 'grpc', 'ttrpc'), default='auto',
                        help='the lane to call on (default: auto, the fast lane when its socket answers)')
    add_timeout(parser, 'deadline of the call' + ('; 0: none, for a streamed answer' if streams else ''),
                zero=streams)


def add_timeout(parser: argparse.ArgumentParser, what: str, *, zero: bool = False) -> None:
    """``--timeout SECONDS`` (default 5), more than 0 unless ``zero``."""
    parser.add_argument('--timeout', type=seconds if zero else positive_seconds, default=DEFAULT_TIMEOUT,
                        metavar='SECONDS', help=f'{what} (default {DEFAULT_TIMEOUT:g})')


def seconds(text: str) -> float:
    """A ``--timeout`` value: a number of seconds, 0 or more, at most
    :data:`~vyra_base_ipc._options.MAX_SECONDS`.

    :raises argparse.ArgumentTypeError: anything else, naming it.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number of seconds: {text!r}') from None
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f'must be a finite number of seconds >= 0 and at most '
                                         f'{MAX_SECONDS:g}, not {text}')
    return value


def positive_seconds(text: str) -> float:
    """:func:`seconds`, but more than 0."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError('must be more than 0 seconds')
    return value


def message_bytes(text: str) -> int:
    """``--max-message-bytes``: a number of bytes from 1 to 2**31 - 1, as servers allow."""
    try:
        return validate_max_message_bytes(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'must be a number of bytes from 1 to 2147483647, not {text!r}') from None


def parse_metadata(items: Sequence[str]) -> tuple[tuple[str, str | bytes], ...]:
    """``--metadata key=value`` items as call metadata (keys lower-cased, as
    gRPC requires). The value of a key ending in ``-bin`` is base64 (standard
    or URL-safe alphabet, padded or not), as grpcurl takes it: binary
    metadata is bytes, which a command line cannot carry as they are.

    :raises UsageError: an item without ``=``, a ``-bin`` value that is not
        base64, or a key or value gRPC does not allow
        (:func:`~vyra_base_ipc.ttrpc._messages.checked_metadata`).
    """
    pairs: list[tuple[str, str | bytes]] = []
    for item in items:
        key, separator, value = item.partition('=')
        key = key.strip().lower()
        if not separator or not key:
            raise UsageError(f'--metadata takes KEY=VALUE, not {item!r}')
        pairs.append((key, _base64(key, value) if key.endswith('-bin') else value))
    try:
        checked_metadata(pairs)
    except ValueError as error:
        raise UsageError(f'--metadata: {error}') from None
    return tuple(pairs)


def _base64(key: str, value: str) -> bytes:
    """The bytes of a ``-bin`` key's base64 ``value``.

    :raises UsageError: ``value`` is not base64, naming the key.
    """
    text = value.strip().replace('-', '+').replace('_', '/')  # (the URL-safe alphabet)
    try:
        return base64.b64decode(text + '=' * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f'--metadata: the value of {key!r} (a key ending in "-bin" carries bytes) must be '
                         f'base64, not {value!r}') from None
