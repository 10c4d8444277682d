"""The iceoryx2 echo service both of its ends open: a request-response
service of byte slices and two event services to wake the other side.

iceoryx2's request-response has no wake-up of its own: a side that wants to
sleep until the other has sent pairs it with an event service, as iceoryx2's
``event_based_communication`` example does for publish-subscribe. The client
notifies ``<service>/to-server`` after sending a request; the server notifies
``<service>/to-client`` after sending the response.

Every file iceoryx2 creates is under ``root`` (the benchmark's temporary
directory) or named ``/dev/shm/<prefix>*`` (its data segments): the prefix is
unique to the run, and :func:`bench.peers.remove_leftovers` removes what is
left of it after the servers have stopped.

One message slot a port and a size class grown by powers of two: a round trip
reuses the same already-mapped memory from its second call on, instead of
touching a fresh slot of up to 128 MiB first (the warm-up calls before every
row grow it).
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ['PARK', 'Endpoint']

#: A request of no bytes: "stop spinning and sleep until woken" to a
#: spinning server (the payloads echoed are never empty).
PARK = 0
#: The size class a port starts with; it grows (power of two) as payloads do.
_INITIAL_SLICE = 64


class Endpoint:
    """One end of the service: its node, the request-response port
    (``port``: a ``Client`` or a ``Server``), and a ``listener`` and a
    ``notifier`` on the two event services.

    :param where: ``{"service", "root", "prefix"}`` as the server reported.
    :param role: ``"client"`` or ``"server"``.
    """

    def __init__(self, where: dict[str, Any], role: str) -> None:
        import iceoryx2 as iox2

        if role not in ('client', 'server'):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        config = iox2.config.default()
        config.global_cfg.root_path = iox2.Path.new(where['root'])
        config.global_cfg.prefix = iox2.FileName.new(where['prefix'])
        self.node = iox2.NodeBuilder.new().config(config).create(iox2.ServiceType.Ipc)
        name = where['service']
        self._service = (
            self.node.service_builder(iox2.ServiceName.new(name))
            .request_response(iox2.Slice[ctypes.c_uint8], iox2.Slice[ctypes.c_uint8])
            .max_active_requests_per_client(1).max_loaned_requests(1)
            .max_response_buffer_size(1).max_borrowed_responses_per_pending_response(1)
            .open_or_create())
        self._events = {direction: self.node.service_builder(iox2.ServiceName.new(f'{name}/{direction}'))
                        .event().open_or_create() for direction in ('to-server', 'to-client')}
        mine, theirs = ('to-server', 'to-client') if role == 'server' else ('to-client', 'to-server')
        grow = iox2.AllocationStrategy.PowerOfTwo
        if role == 'server':
            self.port = (self._service.server_builder().initial_max_slice_len(_INITIAL_SLICE)
                         .max_loaned_responses_per_request(1).allocation_strategy(grow).create())
        else:
            self.port = (self._service.client_builder().initial_max_slice_len(_INITIAL_SLICE)
                         .allocation_strategy(grow).create())
        self.listener = self._events[mine].listener_builder().create()
        self.notifier = self._events[theirs].notifier_builder().create()

    def close(self) -> None:
        """Release the ports, then the services and the node, in that order.
        Left to the garbage collector at interpreter exit, the node could go
        first; a process whose ports outlived their node busy-looped at exit
        instead of ending (iceoryx2 0.10.0)."""
        for port in (self.notifier, self.listener, self.port):
            port.delete()
        del self.notifier, self.listener, self.port
        self._events.clear()
        del self._service, self.node

