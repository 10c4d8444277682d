"""What the benchmark measures: transports (a client, a server, an address)
and the lanes through which this package's clients reach :class:`IPCServer`.

Adding a lane of the package (the ttrpc fast lane, shared memory) is one
:class:`Lane` in :data:`LANES`: it yields a ``SyncIPCHandler`` row and an
``IPCHandler`` row, measured with everything else, charted and checked by the
smoke test. A lane whose code is not there yet is reported as skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import importlib.util
import inspect
from typing import Any, Callable

__all__ = ['LANES', 'LARGE_PAYLOAD_LANES', 'Lane', 'Transport', 'ipc_server_options', 'transports']


@dataclass(frozen=True)
class Lane:
    """One way :class:`IPCHandler` and :class:`SyncIPCHandler` reach :class:`IPCServer`.

    :param name: short name used in transport keys (``ipc-aio-<name>``).
    :param description: one line for the table's legend.
    :param client_options: keyword arguments for both clients on this lane.
    :param server_options: keyword arguments this lane needs on ``IPCServer``
        (one server process serves every lane; the options of all available
        lanes are merged).
    :param unavailable: why this lane cannot be measured here, or ``None``.
    """

    name: str
    description: str
    client_options: Callable[[], dict[str, Any]] = dict
    server_options: Callable[[], dict[str, Any]] = dict
    unavailable: Callable[[], str | None] = lambda: None


def _client_accepts(parameter: str) -> bool:
    from vyra_base_ipc.client import IPCHandler

    return any(parameter in inspect.signature(vars(cls)['__init__']).parameters
               for cls in IPCHandler.__mro__ if '__init__' in vars(cls))


def _grpc_lane_options() -> dict[str, Any]:
    # Once the clients choose their lane themselves ('auto' prefers the fast
    # lane), this row must pin gRPC or it would silently measure another lane.
    return {'lane': 'grpc'} if _client_accepts('lane') else {}


def _needs(module: str, client_option: str, *former_names: str) -> Callable[[], str | None]:
    """Available once ``module`` (or one of its ``former_names``, to measure
    older copies with ``--package-root``) exists and the clients take
    ``client_option``."""
    def unavailable() -> str | None:
        found = False
        for name in (module, *former_names):
            try:
                found = found or importlib.util.find_spec(name) is not None
            except ModuleNotFoundError:
                pass
        if not found:
            return f'{module} does not exist yet'
        if not _client_accepts(client_option):
            return f'the clients take no {client_option!r} option yet'
        return None
    return unavailable


def _fast_lane_options() -> dict[str, Any]:
    # Every message inline, so that this row measures the framing alone.
    return {'lane': 'ttrpc', 'shared_memory': None} if _client_accepts('shared_memory') else {
        'lane': 'ttrpc'}


#: Messages are held to max_message_bytes however they travel: the shared
#: memory rows raise it (on both ends) to carry the 100 MiB payload.
_LARGE_MESSAGE_BYTES = 128 * 1024 * 1024


def _shared_memory_options() -> dict[str, Any]:
    # The clients' default: messages over 1 MiB as shared memory.
    return {'lane': 'ttrpc', 'max_message_bytes': _LARGE_MESSAGE_BYTES}


def _large_messages() -> dict[str, Any]:
    return {'max_message_bytes': _LARGE_MESSAGE_BYTES}


LANES: tuple[Lane, ...] = (
    Lane('grpc', 'gRPC (HTTP/2) on the Unix socket', _grpc_lane_options),
    Lane('ttrpc', 'fast lane: ttrpc framing on the .ttrpc.sock socket, every message inline',
         _fast_lane_options, unavailable=_needs('vyra_base_ipc.ttrpc', 'lane')),
    Lane('shm', 'fast lane, messages over 1 MiB as sealed memfd (the default)',
         _shared_memory_options, _large_messages,
         _needs('vyra_base_ipc._payload', 'shared_memory', 'vyra_base_ipc.payload')),
)

#: Lanes that also carry :data:`~bench.payloads.LARGE_PAYLOAD` (beyond the
#: message size limit of the others).
LARGE_PAYLOAD_LANES = frozenset({'shm'})


@dataclass(frozen=True)
class Transport:
    """One row family of the results: a client driver against a server kind.

    :param key: stable identifier, used in the JSON and by the smoke test.
    :param client: driver name in :mod:`bench.drivers`.
    :param server: server kind in :mod:`bench.servers`.
    :param address: ``uds``, ``tcp`` or ``dds``.
    :param asynchronous: the client keeps several calls in flight, so it is
        also measured at concurrency > 1.
    :param options: keyword arguments for the client (a lane's options).
    :param sizes: the payload sizes that make sense for it (all if ``None``).
    """

    key: str
    label: str
    client: str
    server: str
    address: str
    lane: str | None = None
    asynchronous: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: Payload sizes measured; ``None`` for all of them.
    sizes: tuple[int, ...] | None = None
    #: The event loop an asynchronous client runs on: ``None`` for asyncio's
    #: own, ``'uvloop'`` for uvloop's.
    loop: str | None = None

    def to_json(self) -> dict[str, Any]:
        """This transport as a JSON object (for the worker's spec and the results)."""
        return asdict(self)


_BASE = (
    Transport('socket-uds', 'Unix socket echo (the floor)', 'socket', 'socket', 'uds'),
    Transport('grpc-sync-uds', 'grpcio sync stub, UDS', 'grpc-sync', 'grpc', 'uds'),
    Transport('grpc-aio-uds', 'grpcio aio stub, UDS', 'grpc-aio', 'grpc', 'uds',
              asynchronous=True),
)
_AFTER_LANES = (
    Transport('grpc-sync-tcp', 'grpcio sync stub, TCP 127.0.0.1', 'grpc-sync', 'grpc', 'tcp'),
    Transport('grpc-aio-tcp', 'grpcio aio stub, TCP 127.0.0.1', 'grpc-aio', 'grpc', 'tcp',
              asynchronous=True),
    Transport('rclpy-dds', 'rclpy service, Fast DDS on localhost', 'rclpy', 'rclpy', 'dds'),
    Transport('rclpy-trigger', 'rclpy std_srvs/Trigger call (no payload), Fast DDS on localhost',
              'rclpy-trigger', 'rclpy', 'dds', sizes=(0,)),
)


def _lane_transports(lane: Lane) -> tuple[Transport, ...]:
    options = lane.client_options()
    return (
        Transport(f'ipc-sync-{lane.name}', f'SyncIPCHandler, {lane.name} lane', 'ipc-sync', 'ipc',
                  'uds', lane.name, options=options),
        Transport(f'ipc-aio-{lane.name}', f'IPCHandler, {lane.name} lane', 'ipc-aio', 'ipc',
                  'uds', lane.name, asynchronous=True, options=options),
    )


def _missing(*modules: str) -> str | None:
    absent = [module for module in modules if importlib.util.find_spec(module) is None]
    return f'not installed: {", ".join(absent)}' if absent else None


#: Transports that need more than the package's own dependencies.
_NEEDS = {'rclpy-dds': ('rclpy', 'test_msgs'), 'rclpy-trigger': ('rclpy', 'std_srvs')}


def transports(lanes: tuple[Lane, ...] = LANES) -> tuple[list[Transport], list[dict[str, str]]]:
    """The transports to measure, and ``{transport, reason}`` for those skipped."""
    measured = list(_BASE)
    skipped: list[dict[str, str]] = []
    for lane in lanes:
        reason = lane.unavailable()
        if reason is None:
            measured.extend(_lane_transports(lane))
        else:
            skipped.extend({'transport': key, 'reason': reason}
                           for key in (f'ipc-sync-{lane.name}', f'ipc-aio-{lane.name}'))
    for transport in _AFTER_LANES:
        reason = _missing(*_NEEDS.get(transport.key, ()))
        if reason is None:
            measured.append(transport)
        else:
            skipped.append({'transport': transport.key, 'reason': reason})
    return measured, skipped


def ipc_server_options(lanes: tuple[Lane, ...] = LANES) -> dict[str, Any]:
    """``IPCServer`` keyword arguments that every available lane needs."""
    options: dict[str, Any] = {}
    for lane in lanes:
        if lane.unavailable() is None:
            options.update(lane.server_options())
    return options
