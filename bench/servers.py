"""The servers of the benchmark.

Each runs as its own process::

    python -m bench.servers socket PATH
    python -m bench.servers socket-stream PATH
    python -m bench.servers ttrpc-minimal PATH   # bench.minimal_ttrpc: the protocol's Python floor
    python -m bench.servers ttrpc-minimal-aio PATH   # the same on asyncio's loop
    python -m bench.servers protobuf-alone PATH  # bench.protobuf_alone: protobuf's own work for an echo
    python -m bench.servers grpc PATH          # also listens on 127.0.0.1:<free port>
    python -m bench.servers ipc PATH [JSON IPCServer options, busy_poll, keep_freed_memory]
    python -m bench.servers rclpy SERVICE_NAME
    python -m bench.servers zmq|iceoryx2|zenoh ...   # the peers: bench.peer_servers

When ready, a server prints one JSON line on stdout (``{"ready": {...}}``, with
the TCP port where there is one). It serves until its standard input closes
(so it never outlives the benchmark) or it gets SIGTERM/SIGINT.

Every server echoes: the reply carries the request's bytes, with as little
handler work as the framework allows (gRPC handlers return the request
message itself; the ROS 2 handler copies one string reference). The gRPC
servers also stream (``Stream``, ``Watch``); ``socket-stream`` is the plain
socket's stream: for each 16-byte request (count, size, 8 unused bytes) it sends
``count`` frames of ``size`` bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from .framing import HEADER, STREAM_REQUEST, recv_exact, send_frame

__all__ = ['BenchEcho', 'main']

#: The ROS 2 service every rclpy row calls.
ROS_SERVICE = '/vyra_bench/echo'
#: A ``std_srvs/Trigger`` service of the same node: the smallest ROS 2 call,
#: the reference of the fast lane's latency target.
ROS_TRIGGER_SERVICE = '/vyra_bench/trigger'
#: Message size limit of the gRPC servers and bare clients (IPCServer's default).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _ready(**info: Any) -> None:
    # The pid: the peers section reads the server's CPU clock by it.
    print(json.dumps({'ready': {**info, 'pid': os.getpid()}}), flush=True)


# -- plain Unix socket ---------------------------------------------------------------


def _serve_socket_connection(conn: socket.socket) -> None:
    header = bytearray(HEADER.size)
    body = bytearray()
    with conn:
        while recv_exact(conn, memoryview(header)):
            (size,) = HEADER.unpack(header)
            if len(body) < size:
                body = bytearray(size)
            view = memoryview(body)[:size]
            if not recv_exact(conn, view):
                return
            send_frame(conn, header, view)


def serve_socket(path: str) -> None:
    """Thread per connection, blocking sockets: the cheapest echo Python does."""
    _serve_threads(path, _serve_socket_connection)


def _serve_threads(path: str, serve: Callable[[socket.socket], None]) -> None:
    """Listen on ``path``; ``serve`` each connection in a thread of its own."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    _ready(path=path)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin
    finally:
        listener.close()
        os.unlink(path)


def _serve_stream_connection(conn: socket.socket) -> None:
    request = bytearray(STREAM_REQUEST.size)
    with conn:
        while recv_exact(conn, memoryview(request)):
            count, size, _ = STREAM_REQUEST.unpack(request)
            header, body = HEADER.pack(size), bytes(size)
            for _ in range(count):
                send_frame(conn, header, body)


def serve_socket_stream(path: str) -> None:
    """Thread per connection, blocking sockets, one ``sendmsg`` per message:
    the cheapest server stream Python does."""
    _serve_threads(path, _serve_stream_connection)


# -- gRPC ----------------------------------------------------------------------------


def _bench_modules() -> tuple[Any, Any]:
    from vyra_bench import bench_pb2, bench_pb2_grpc
    return bench_pb2, bench_pb2_grpc


#: Watches whose end a server remembers (the latest ones).
_WATCHES_KEPT = 1024


def BenchEcho() -> Any:  # named as the class it makes: its base class is generated
    """A ``BenchServiceServicer`` whose ``Echo`` returns the request, with the
    streams of :mod:`bench.streaming`."""
    bench_pb2, bench_pb2_grpc = _bench_modules()
    # Here, not in the handlers: an import statement per call is Python the
    # shared-memory rows would measure as the package's.
    from vyra_base_ipc import attach_buffers, received_buffer, shared_buffer

    class Echo(bench_pb2_grpc.BenchServiceServicer):  # type: ignore[name-defined]
        async def Echo(self, request: Any, context: Any) -> Any:
            return request

        async def Touch(self, request: Any, context: Any) -> Any:
            from .zerocopy import backing_file

            view = shared_buffer(request.data, context)
            return bench_pb2.BufferReply(size=len(view), first_byte=view[0] if len(view) else 0,
                                         last_byte=view[-1] if len(view) else 0,
                                         backing=backing_file(view))

        async def CpuTime(self, request: Any, context: Any) -> Any:
            return bench_pb2.CpuTimeReply(seconds=time.process_time())

        async def Mirror(self, request: Any, context: Any) -> Any:
            received = received_buffer(request.data, context)
            return attach_buffers(context, bench_pb2.BufferRequest(data=received.ref), received)

        async def Stream(self, request: Any, context: Any) -> Any:
            message = bench_pb2.Blob(data=bytes(request.size))
            for _ in range(request.count):
                yield message

        async def Watch(self, request: Any, context: Any) -> Any:
            message = bench_pb2.Blob(data=bytes(request.size))
            try:
                while True:
                    yield message
                    await asyncio.sleep(0.001)
            finally:
                # However the handler ends (cancelled in its sleep, closed at
                # its yield), this is when the server let go of the stream.
                watches_ended[request.id] = time.monotonic_ns()
                while len(watches_ended) > _WATCHES_KEPT:
                    del watches_ended[next(iter(watches_ended))]

        async def WatchEnded(self, request: Any, context: Any) -> Any:
            return bench_pb2.WatchEnd(monotonic_ns=watches_ended.get(request.id, 0))

    watches_ended: dict[int, int] = {}
    return Echo()


async def serve_grpc(path: str) -> None:
    """A bare ``grpc.aio`` server on the Unix socket and on 127.0.0.1."""
    import grpc

    _, bench_pb2_grpc = _bench_modules()
    limits = [('grpc.max_send_message_length', MAX_MESSAGE_BYTES),
              ('grpc.max_receive_message_length', MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=limits)
    bench_pb2_grpc.add_BenchServiceServicer_to_server(BenchEcho(), server)
    server.add_insecure_port(f'unix:{path}')
    port = server.add_insecure_port('127.0.0.1:0')
    await server.start()
    _ready(path=path, tcp=f'127.0.0.1:{port}')
    try:
        await _wait_stop()
    finally:
        await server.stop(None)


async def serve_ipc(path: str, options: dict[str, Any], keeps_freed_memory: bool = False) -> None:
    """This package's :class:`IPCServer` with the benchmark's echo service
    (``keeps_freed_memory``: whether its process does, for the ready line)."""
    from vyra_base_ipc import IPCServer

    server = IPCServer(path, servicers=[BenchEcho()], grace_period=0.5, **options)
    await server.start()
    _ready(path=path, options=options, keep_freed_memory=keeps_freed_memory)
    try:
        await _wait_stop()
    finally:
        await server.stop()


async def serve_minimal_aio(path: str) -> None:
    """The minimal ttrpc server on the running event loop
    (:class:`bench.minimal_ttrpc.ServerProtocol`) until stdin closes."""
    from .minimal_ttrpc import ServerProtocol

    server = await asyncio.get_running_loop().create_unix_server(ServerProtocol, path)
    async with server:
        _ready(path=path)
        await _wait_stop()


async def _wait_stop() -> None:
    """Return on SIGTERM/SIGINT or when standard input closes."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)

    def watch_stdin() -> None:
        sys.stdin.read()
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop is gone already
            pass

    # A daemon thread, not the loop's executor: asyncio.run() would wait for
    # an executor thread still blocked in read() after a signal.
    threading.Thread(target=watch_stdin, daemon=True).start()
    await stop.wait()


# -- ROS 2 ---------------------------------------------------------------------------


def serve_rclpy(service_name: str) -> None:
    """An rclpy node serving ``test_msgs/srv/BasicTypes`` as an echo of
    ``string_value``, and ``std_srvs/Trigger`` on :data:`ROS_TRIGGER_SERVICE`;
    single-threaded executor, default service QoS."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from std_srvs.srv import Trigger
    from test_msgs.srv import BasicTypes

    rclpy.init()
    node = rclpy.create_node('vyra_bench_echo')

    def echo(request: Any, response: Any) -> Any:
        response.string_value = request.string_value
        return response

    def trigger(request: Any, response: Any) -> Any:
        response.success = True
        return response

    node.create_service(BasicTypes, service_name, echo)
    node.create_service(Trigger, ROS_TRIGGER_SERVICE, trigger)
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def watch_stdin() -> None:
        sys.stdin.read()
        rclpy.try_shutdown()

    threading.Thread(target=watch_stdin, daemon=True).start()
    _ready(service=service_name)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.servers KIND WHERE ...``, as the module docstring says."""
    from .peer_servers import PEER_SERVERS

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ('socket', 'socket-stream', 'ttrpc-minimal', 'ttrpc-minimal-aio',
                                   'protobuf-alone', 'grpc', 'ipc', 'rclpy', *PEER_SERVERS) \
            or len(args) < 2:
        sys.exit(__doc__)
    kind, where = args[0], args[1]
    if kind in PEER_SERVERS:
        serve, count = PEER_SERVERS[kind]
        if len(args) != 1 + count:
            sys.exit(f'{kind} takes {count} arguments, not {len(args) - 1}')
        serve(*args[1:])
    elif kind in ('socket', 'socket-stream', 'ttrpc-minimal', 'protobuf-alone'):
        from . import minimal_ttrpc, protobuf_alone

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if kind == 'ttrpc-minimal':
            _serve_threads(where, minimal_ttrpc.serve_connection)
        elif kind == 'protobuf-alone':
            from vyra_base_ipc import keep_freed_memory

            keep_freed_memory()  # (see bench.protobuf_alone: the fairest case)
            _serve_threads(where, protobuf_alone.serve_connection)
        else:
            (serve_socket if kind == 'socket' else serve_socket_stream)(where)
    elif kind == 'ttrpc-minimal-aio':
        # asyncio's own loop, which does not poll: its CPU time per call is
        # its work, as that of an ipc server with busy_poll 0 (a polling
        # loop spins between calls, and its time depends on the client's).
        asyncio.run(serve_minimal_aio(where))
    elif kind == 'grpc':
        asyncio.run(serve_grpc(where))
    elif kind == 'ipc':
        from vyra_base_ipc import DEFAULT_BUSY_POLL, keep_freed_memory, run

        options = json.loads(args[2]) if len(args) > 2 else {}
        # Not IPCServer options: the event loop's and the process's, set as
        # the ipc_server node sets them by default (busy_poll_us,
        # keep_freed_memory_mb). Without the latter, the rows measured first
        # decided how many page faults the later ones paid on this server.
        busy_poll = options.pop('busy_poll', DEFAULT_BUSY_POLL)
        kept = keep_freed_memory() if options.pop('keep_freed_memory', True) else False
        run(serve_ipc(where, options, kept), busy_poll=busy_poll)
    else:
        serve_rclpy(where)


if __name__ == '__main__':
    main()
