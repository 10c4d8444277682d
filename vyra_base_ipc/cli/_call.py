"""``vyra-ipc call TARGET SERVICE/METHOD [REQUEST]``: one call of any
method on the lane asked for; the request as JSON or YAML, the answer as
JSON (one document per streamed message)."""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time
from typing import TextIO

from .._options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT
from ..exceptions import IPCTimeoutError
from ._args import EXIT_OK, UsageError, Verb, add_lane, add_target, message_bytes, parse_metadata
from ._messages import inline_buffers, parse_request, stub_class, to_json
from ._targets import client, reflection, resolve_target

__all__ = ['VERB']


#: How the client's DEADLINE_EXCEEDED of a stream says how to do without a deadline
#: (vyra_base_ipc._deadline.Deadline.explain), and how this command says it.
_API_HINT = 'stream_method(..., timeout=None): a stream without one'
_CLI_HINT = '--timeout 0: a stream without one'
#: Least time a call is given, in seconds, when reading the reflection took all of --timeout.
_LEAST = 1e-3
#: Share of --timeout that reading the reflection took from the call, from which a timeout says so.
_NAMED_SHARE = 0.1


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    parser.add_argument('method', metavar='SERVICE/METHOD', help='e.g. vyra.ipc.ModuleService/ExecuteCommand')
    parser.add_argument('request', metavar='REQUEST', nargs='?', default='{}',
                        help="JSON or YAML (default {}); '-' reads it from stdin, @FILE from a file; "
                             'a list of requests for methods that stream them')
    parser.add_argument('--metadata', '-m', action='append', default=[], metavar='KEY=VALUE',
                        help='call metadata (repeatable); a key ending in -bin takes its value in base64')
    parser.add_argument('--max-message-bytes', type=message_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
                        metavar='N', help='largest message sent or accepted (default 16 MiB, as servers '
                                          "have it; a server's max_message_bytes parameter may allow more)")
    add_lane(parser, streams=True)


def _request_text(argument: str) -> str:
    """The request as given: inline, ``-`` (stdin) or ``@FILE``, as text.

    :raises UsageError: the file cannot be read, there is no stdin (closed),
        or the bytes are not UTF-8 text; naming where the request came from.
    """
    if argument == '-':
        if sys.stdin is None:  # (started with its stdin closed)
            raise UsageError("'-' reads the request from stdin, but there is no stdin (it is closed)")
        data, source = sys.stdin.buffer.read(), 'stdin'
    elif argument.startswith('@'):
        name = argument[1:]
        if not name:
            raise UsageError('@FILE reads the request from a file: give its name after the @')
        try:
            data, source = Path(name).read_bytes(), name
        except OSError as error:
            raise UsageError(f'cannot read the request from {name}: {error.strerror}') from None
    else:
        # Bytes of the command line that are not UTF-8 came as lone surrogates.
        data, source = argument.encode('utf-8', 'surrogateescape'), 'the command line'
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise UsageError(f'the request from {source} is not UTF-8 text: byte {data[error.start]:#04x} '
                         f'at offset {error.start}') from None


def _run(args: argparse.Namespace, out: TextIO) -> int:
    text = _request_text(args.request)
    metadata = parse_metadata(args.metadata)
    path = resolve_target(args.target)
    timeout = args.timeout or DEFAULT_TIMEOUT  # 0: a streamed answer without deadline
    started = time.monotonic()
    # Message types come from the server's reflection (on its gRPC lane);
    # the call itself travels on the lane asked for.
    with reflection(path, timeout) as server:
        try:
            method = server.method(args.method)
        except LookupError as error:
            raise UsageError(str(error)) from None
        try:
            request = parse_request(text, method)
        except ValueError as error:
            raise UsageError(str(error)) from None
        stub = stub_class(method.containing_service)
    if args.timeout == 0 and not method.server_streaming:
        raise UsageError(f'--timeout 0 (no deadline) is only for methods that stream their answers; '
                         f'{method.name} answers once')
    # One --timeout for the whole command: the call gets what reading the
    # reflection left of it (at least a millisecond, to fail as a call does).
    spent = time.monotonic() - started
    left = max(timeout - spent, _LEAST)
    with client(path, stub, args.lane, left, args.max_message_bytes) as handler:
        try:
            if method.server_streaming:
                stream_timeout = left if args.timeout else None  # --timeout 0: none
                for response in handler.stream_method(method.name, request, timeout=stream_timeout,
                                                      metadata=metadata):
                    print(to_json(response), file=out, flush=True)
            else:
                # On the fast lane a buffer in the answer may come as shared memory: its bytes are
                # shown as the gRPC lane would send them, inline.
                answer, buffers = handler.call_method(method.name, request, metadata=metadata,
                                                      return_buffers=True)
                try:
                    inline_buffers(answer, buffers)
                finally:
                    buffers.close()
                print(to_json(answer), file=out)
        except IPCTimeoutError as error:
            # The client names its API and the timeout it was given; here the knob is --timeout,
            # part of which went on reading the reflection.
            given = f'--timeout {args.timeout:g} s'
            if spent >= _NAMED_SHARE * timeout:
                given += f", of which reading the server's reflection took {spent:.2f} s"
            details = error.details.replace(_API_HINT, _CLI_HINT).replace(
                f"the call's timeout of {left:g} s", given)
            raise IPCTimeoutError(error.code, details, method=error.method) from None
    return EXIT_OK


VERB = Verb('call', 'call a method: the request as JSON or YAML, the answer as JSON (one document per '
                    'streamed message)', _add_arguments, _run)
