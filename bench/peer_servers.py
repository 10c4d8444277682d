"""The echo servers of the peers: what a Python robotics developer would
pick instead of this package (``bench/requirements.txt``).

Each runs as its own process, started by :mod:`bench.servers`::

    python -m bench.servers zmq PATH                     # REP on ipc://PATH
    python -m bench.servers iceoryx2 SERVICE MODE ROOT PREFIX   # MODE: event | spin
    python -m bench.servers zenoh PATH                   # queryable, unix socket PATH

Like the other servers, each prints one ready line (with its pid, whose CPU
clock the peers section reads) and serves until its standard input closes.
Every one echoes the request's bytes in the way its library offers for large
messages without copies: pyzmq hands the received frame back (``copy=False``),
iceoryx2 copies the request slice into a loaned response slice (one
``memcpy`` in shared memory), zenoh replies with the query's payload object.

iceoryx2's two modes: ``event`` sleeps on its event listener until a client's
notification; ``spin`` busy-loops on ``receive()`` (no system call per
request) while woken: a client wakes it with a notification before a block of
calls and parks it with an empty request after, so that it never spins
through another variant's blocks.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from typing import Any, Callable

__all__ = ['PEER_SERVERS', 'serve_iceoryx2', 'serve_zenoh', 'serve_zmq']

#: Key expression of the zenoh queryable.
ZENOH_KEY = 'vyra/bench/echo'
#: How often a waiting server looks whether it should stop, in seconds.
_STOP_CHECK = 0.2


def _ready(**info: Any) -> None:
    print(json.dumps({'ready': {**info, 'pid': os.getpid()}}), flush=True)


def _on_stdin_closed(action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a daemon thread once standard input closes (the
    benchmark's signal to stop)."""
    def watch() -> None:
        sys.stdin.read()
        action()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- pyzmq ---------------------------------------------------------------------------


def serve_zmq(path: str) -> None:
    """A REP socket bound to ``ipc://PATH``: receive a frame, send it back,
    both without copying (small frames are copied by pyzmq anyway)."""
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.bind(f'ipc://{path}')
    # Terminating the context from another thread is how a blocking recv()
    # is ended in ZeroMQ: it raises ContextTerminated (ETERM).
    _on_stdin_closed(context.term)
    _ready(path=f'ipc://{path}')
    try:
        while True:
            socket.send(socket.recv(copy=False), copy=False)
    except zmq.ContextTerminated:
        socket.close(linger=0)


# -- iceoryx2 ------------------------------------------------------------------------


def _echo(request: Any) -> int:
    """Answer ``request`` with a copy of its bytes; return their count."""
    size = request.payload().len()
    response = request.loan_slice_uninit(size)
    ctypes.memmove(response.payload_ptr, request.payload_ptr, size)
    response.assume_init().send()
    request.delete()
    return size


def _serve_events(endpoint: Any, stopping: threading.Event) -> None:
    import iceoryx2 as iox2

    server, listener, notifier = endpoint.port, endpoint.listener, endpoint.notifier
    wait = iox2.Duration.from_secs_f64(_STOP_CHECK)
    while not stopping.is_set():
        listener.timed_wait(wait)
        while (request := server.receive()) is not None:
            _echo(request)
            notifier.notify()


def _serve_spinning(endpoint: Any, stopping: threading.Event) -> None:
    import iceoryx2 as iox2

    from .iceoryx2_service import PARK

    server, listener = endpoint.port, endpoint.listener
    wait = iox2.Duration.from_secs_f64(_STOP_CHECK)
    while not stopping.is_set():
        if not listener.timed_wait(wait):  # parked until a client wakes us
            continue
        spins = 0
        while True:
            request = server.receive()
            if request is None:
                spins += 1
                if not spins & 0xFFFF and stopping.is_set():
                    return
                continue
            if _echo(request) == PARK:
                break


def serve_iceoryx2(service: str, mode: str, root: str, prefix: str) -> None:
    """The iceoryx2 echo service ``service`` (files under ``root``, shared
    memory named ``prefix*``), waiting for requests on events or spinning."""
    from .iceoryx2_service import Endpoint

    serve = {'event': _serve_events, 'spin': _serve_spinning}.get(mode)
    if serve is None:
        raise ValueError(f"iceoryx2 mode must be 'event' or 'spin', not {mode!r}")
    where = {'service': service, 'root': root, 'prefix': prefix}
    endpoint = Endpoint(where, 'server')
    stopping = threading.Event()
    _on_stdin_closed(stopping.set)
    _ready(**where, mode=mode)
    try:
        serve(endpoint, stopping)
    finally:
        endpoint.close()


# -- zenoh ---------------------------------------------------------------------------


def zenoh_config(path: str, role: str) -> Any:
    """A zenoh session on the unix socket ``path`` only: the server
    (``role="server"``, a peer) listens, the client connects; no scouting.
    Shared memory stays as zenoh configures it by default (on, used for
    large payloads without asking)."""
    import zenoh

    config = zenoh.Config()
    endpoint = json.dumps([f'unixsock-stream/{path}'])
    if role == 'server':
        config.insert_json5('mode', '"peer"')
        config.insert_json5('listen/endpoints', endpoint)
    else:
        config.insert_json5('mode', '"client"')
        config.insert_json5('connect/endpoints', endpoint)
    config.insert_json5('scouting/multicast/enabled', 'false')
    return config


def serve_zenoh(path: str) -> None:
    """A queryable on :data:`ZENOH_KEY` answering every query with its own payload."""
    import zenoh

    session = zenoh.open(zenoh_config(path, 'server'))

    def echo(query: Any) -> None:
        query.reply(query.key_expr, query.payload)

    queryable = session.declare_queryable(ZENOH_KEY, echo)
    _ready(path=path, key=ZENOH_KEY)
    try:
        sys.stdin.read()
    finally:
        queryable.undeclare()
        session.close()


#: Server kind -> (function, the number of its arguments).
PEER_SERVERS: dict[str, tuple[Callable[..., None], int]] = {
    'zmq': (serve_zmq, 1),
    'iceoryx2': (serve_iceoryx2, 4),
    'zenoh': (serve_zenoh, 1),
}
