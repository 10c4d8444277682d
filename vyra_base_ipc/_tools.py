"""The tools every :class:`~vyra_base_ipc.IPCServer` serves beside a module's
own services, so that ``grpcurl``, ``grpc_health_probe`` and ``vyra-ipc``
work against any module's socket: ``grpc.health.v1.Health`` and
``vyra.ipc.Introspection`` on both lanes, server reflection on the gRPC lane.

They are neither observed nor intercepted, but guarded as a module's own
services are (:mod:`._request_guard`): a request that does not decode is
INVALID_ARGUMENT on both lanes. (Served as grpc.aio serves any servicer, it
was UNKNOWN on the gRPC lane, with an ERROR and its traceback logged for
each such request.) Their answers are held to ``max_message_bytes`` as the
module's are (:mod:`._answer_size`): any of them can be over it (a
reflection answer carries its request back, and a file's descriptors with
all they import; introspection's stats grow with the methods and status
codes seen), and the gRPC lane left those to grpc core, whose client got
"Sent message larger than max" alone and whose log said only
"ExecuteBatchError raised in core".
"""

from __future__ import annotations

from concurrent import futures
from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from ._grpc_observe import observe_handlers
from ._grpc_streams import OpenStreams
from ._health import HealthServicer
from ._introspection import SERVICE_NAME as INTROSPECTION_SERVICE
from ._introspection import IntrospectionServicer
from ._methods import ServiceRegistration, record_servicer
from ._request_guard import guard_handlers
from .introspection_pb2_grpc import add_IntrospectionServicer_to_server

__all__ = ['grpc_tool_handlers', 'tool_registrations']


def tool_registrations(health_servicer: HealthServicer, introspection: IntrospectionServicer
                       ) -> list[ServiceRegistration]:
    """Health and introspection, as both lanes serve them."""
    return [*record_servicer(health_servicer, health_pb2_grpc.add_HealthServicer_to_server),
            *record_servicer(introspection, add_IntrospectionServicer_to_server)]


def grpc_tool_handlers(health_servicer: HealthServicer, introspection: IntrospectionServicer,
                       service_names: Iterable[str], executor: futures.Executor, open_streams: OpenStreams,
                       max_message_bytes: int) -> list[tuple[str, dict[str, grpc.RpcMethodHandler]]]:
    """The gRPC lane's tools, each service's name and handlers: health,
    introspection, and reflection (grpc's asyncio servicer) describing
    ``service_names`` and the tools; an answer over ``max_message_bytes``
    ends its call RESOURCE_EXHAUSTED saying so, as a module's does.

    Reflection's stream ends at once when the server stops, as every other
    response stream does (``open_streams``; health's Watch ends itself, once
    it has sent NOT_SERVING): one held open made every stop wait its whole
    grace, and then ended UNAVAILABLE "Cancelling all calls"."""
    reflecting = reflection.aio.ReflectionServicer(
        (*service_names, health.SERVICE_NAME, INTROSPECTION_SERVICE, reflection.SERVICE_NAME))
    reflection_service = record_servicer(reflecting,
                                         reflection_pb2_grpc.add_ServerReflectionServicer_to_server)
    served = []
    for registration in (*tool_registrations(health_servicer, introspection), *reflection_service):
        handlers = guard_handlers(registration.name, registration.handlers, executor)
        if registration.servicer is reflecting:
            handlers = open_streams.track(handlers)
        # (observing nothing: the answers' size checked alone)
        served.append((registration.name, observe_handlers(registration.name, handlers, None,
                                                           max_message_bytes)))
    return served
