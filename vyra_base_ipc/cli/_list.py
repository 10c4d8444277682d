"""``vyra-ipc list [DIR...]``: the IPC servers whose sockets are in the
directories, with state, pid, uid, sockets and services."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import textwrap
from typing import Iterator, TextIO

from ._args import EXIT_HELP, EXIT_OK, Verb, add_json
from ._discovery import DEFAULT_DIRECTORY, PROBE_TIMEOUT, ServerEntry, discover
from ._output import WIDTH, table, wrapped

__all__ = ['VERB']


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('directories', metavar='DIR', nargs='*', type=Path,
                        help=f'directories to look in (default {DEFAULT_DIRECTORY})')
    add_json(parser)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    entries = discover(args.directories or [DEFAULT_DIRECTORY])
    if args.json:
        print(json.dumps([entry.as_json() for entry in entries], indent=2), file=out)
    elif not entries:
        directories = ', '.join(str(directory) for directory in args.directories or [DEFAULT_DIRECTORY])
        print(f'no IPC server sockets in {directories}', file=out)
    else:
        for line in lines(entries):
            print(line, file=out)
    return EXIT_OK


def lines(entries: list[ServerEntry]) -> Iterator[str]:
    """One row per server (the fast lane's socket on a row of its own under
    the gRPC one), then its services and the detail of its state, indented."""
    rows = [('MODULE', 'STATE', 'PID', 'UID', 'SOCKETS (gRPC, fast lane)')]
    rows += [(entry.module, entry.state, str(entry.pid or '-'), str(entry.uid), entry.socket_path)
             for entry in entries]
    header, *texts = table(rows, right=(2, 3))
    yield header
    socket_column = header.index('SOCKETS')
    for entry, text in zip(entries, texts, strict=True):
        yield text
        if entry.ttrpc_socket_path:
            yield ' ' * socket_column + entry.ttrpc_socket_path
        if entry.services:
            yield from wrapped('services: ', entry.services, 2)
        if entry.detail:
            label = f'  {entry.state}: '
            yield from textwrap.wrap(entry.detail, WIDTH, initial_indent=label,
                                     subsequent_indent=' ' * len(label))


VERB = Verb('list', f'the IPC servers whose sockets are in DIR (default {DEFAULT_DIRECTORY}), probed '
                    f'within {PROBE_TIMEOUT:g} s', _add_arguments, _run, EXIT_HELP)
