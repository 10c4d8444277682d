"""The fast lane: the module's gRPC services over containerd's ttrpc framing.

gRPC over a Unix socket pays for HTTP/2 and grpcio's thread hops on every
call. ttrpc (https://github.com/containerd/ttrpc, ``PROTOCOL.md``) keeps the
gRPC service definitions and protobuf messages but frames them with a 10-byte
header made for local, reliable connections. This package speaks it:

- :class:`TtrpcServer` serves the servicers registered for gRPC (each a
  :class:`~vyra_base_ipc._methods.ServiceRegistration`), unchanged, on a
  second socket;
- :class:`AsyncConnection` and :class:`SyncConnection` call methods (each a
  :class:`~vyra_base_ipc._methods.Method`) over one connection each, with
  the deadlines, metadata and errors of the gRPC lane.

Independent implementations interoperate: containerd's Go client (Debian's
1.1.1, unary only) is tested against the server; streams follow
``PROTOCOL.md`` and containerd's 1.2 behaviour (requests ``remote open`` or
``remote closed``, data frames, a bare ``remote closed | no data`` close,
errors as a final Response). Lane selection, pooling and reconnecting belong
to :class:`~vyra_base_ipc.IPCServer` / :class:`~vyra_base_ipc.IPCHandler`.

Between two ends of this package, a Hello call at the start of each
connection agrees on extensions that ttrpc lacks (:mod:`._hello`): shared
memory for large messages, CANCEL frames (a call the client leaves is
cancelled on the server, as on gRPC) and flow control per stream
(:mod:`._flow`). Independent peers never see them.

Not carried over from gRPC: response headers and trailers (accepted from
handlers, not sent), compression and ``context.read()``. With independent
ttrpc servers, a client that gives up drops the answer, and the server stops
the handler at the deadline it was sent.

Layout: :mod:`._frames` (the wire), :mod:`._connection` (one framed
connection, both ends), :mod:`._call` (what both clients share),
:mod:`._aio_client` and :mod:`._sync_client` (the two clients),
:mod:`._dispatch` (calls on the server), :mod:`._server` (connections and
lifecycle of the server).
"""

from __future__ import annotations

from ..address import default_ttrpc_socket_path as ttrpc_socket_path
from ._aio_client import AsyncConnection
from ._context import AsyncServicerContext, ServicerContext
from ._flow import DEFAULT_STREAM_WINDOW
from ._frames import DEFAULT_MAX_DATA_LENGTH
from ._messages import ENVELOPE_ALLOWANCE
from ._server import TtrpcServer
from ._sync_client import SyncConnection

__all__ = [
    'DEFAULT_MAX_DATA_LENGTH',
    'DEFAULT_STREAM_WINDOW',
    'ENVELOPE_ALLOWANCE',
    'AsyncConnection',
    'AsyncServicerContext',
    'ServicerContext',
    'SyncConnection',
    'TtrpcServer',
    'ttrpc_socket_path',
]

