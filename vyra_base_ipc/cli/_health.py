"""``vyra-ipc health TARGET [SERVICE]``: the ``grpc.health.v1`` status of a
server or of one of its services, on the lane asked for."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..exceptions import IPCRemoteError
from ._args import EXIT_FAILED, EXIT_OK, Verb, add_json, add_lane, add_target
from ._targets import client, resolve_target

__all__ = ['VERB']


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    parser.add_argument('service', metavar='SERVICE', nargs='?', default='',
                        help='one service (default: the server as a whole)')
    add_lane(parser)
    add_json(parser)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    path = resolve_target(args.target)
    with client(path, health_pb2_grpc.HealthStub, args.lane, args.timeout) as handler:
        try:
            answer = handler.call_method('Check', health_pb2.HealthCheckRequest(service=args.service))
        except IPCRemoteError as error:
            if error.code is grpc.StatusCode.NOT_FOUND:
                raise IPCRemoteError(error.code, f'the server at {str(path)!r} has no health status for '
                                                 f'{args.service!r} (a service it does not serve)') from None
            raise
        lane = handler.lane_in_use
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if args.json:
        print(json.dumps({'socket_path': str(path), 'service': args.service, 'status': status, 'lane': lane}),
              file=out)
    else:
        print(f'{args.service or "server"}: {status}  ({path}, {lane} lane)', file=out)
    return EXIT_OK if answer.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED


VERB = Verb('health', 'the grpc.health.v1 status of a server or one of its services (exit status 1 '
                      'unless SERVING)', _add_arguments, _run)
