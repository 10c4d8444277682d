"""The fast lane: the module's gRPC services over containerd's ttrpc framing.

gRPC over a Unix socket pays for HTTP/2 and grpcio's thread hops on every
call. ttrpc (https://github.com/containerd/ttrpc, ``PROTOCOL.md``) keeps the
gRPC service definitions and protobuf messages but frames them with a 10-byte
header made for local, reliable connections. This package speaks it:

- :class:`TtrpcServer` serves the servicers registered for gRPC (their
  :class:`~vyra_base_ipc.methods.ServiceRegistration`\\ s), unchanged, on a
  second socket;
- :class:`AsyncConnection` and :class:`SyncConnection` call
  :class:`~vyra_base_ipc.methods.Method`\\ s over one connection each, with
  the deadlines, metadata and errors of the gRPC lane.

Independent implementations interoperate: containerd's Go client (Debian's
1.1.1, unary only) is tested against the server; streams follow
``PROTOCOL.md`` and containerd's 1.2 behaviour (requests ``remote open`` or
``remote closed``, data frames, a bare ``remote closed | no data`` close,
errors as a final Response). Lane selection, pooling and reconnecting belong
to :class:`~vyra_base_ipc.IPCServer` / :class:`~vyra_base_ipc.IPCHandler`.

Not carried over from gRPC: response headers and trailers (accepted from
handlers, not sent), compression, ``context.read()``, and cancelling a call
from the client (ttrpc has no cancel message: a client that gives up drops
the answer; the server stops the handler at the deadline it was sent).
"""

from __future__ import annotations

from ..address import default_ttrpc_socket_path as ttrpc_socket_path
from .client import AsyncConnection, SyncConnection
from .context import AsyncServicerContext, ServicerContext
from .framing import DEFAULT_MAX_DATA_LENGTH
from .messages import ENVELOPE_ALLOWANCE
from .server import TtrpcServer

__all__ = [
    'DEFAULT_MAX_DATA_LENGTH',
    'ENVELOPE_ALLOWANCE',
    'AsyncConnection',
    'AsyncServicerContext',
    'ServicerContext',
    'SyncConnection',
    'TtrpcServer',
    'ttrpc_socket_path',
]

