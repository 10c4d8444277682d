"""A real server process for test_answer_types.py: handlers whose answers
are checked against their method's response type, where that type is not
found the usual way, and handlers whose own serializers take other answers.

Usage: answer_server.py SOCKET_PATH (with the protos test_answer_types.py
generated importable: ``answers/answers.proto`` declares AnswerService, whose
messages all come from other files, so that ``answers_pb2_grpc`` does not
import ``answers_pb2``; nor does this server).

- ``AnswerService``: ``Unary`` answers a ``google.protobuf.Empty`` (not its
  ``Reply``), ``Stream`` (a ``def`` handler) yields two ``Reply`` messages,
  then an ``Empty``; ``Nothing`` answers the ``Empty`` it should.
- ``EchoService`` through an add function of its own: ``Echo`` answers the
  bytes of an ``EchoReply`` (its serializer passes bytes through),
  ``EchoSync`` a dict (its serializer makes the ``EchoReply``).
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

from answers import answers_pb2_grpc, replies_pb2
from google.protobuf import empty_pb2
import grpc
from vyra_ipc_test import echo_pb2

from vyra_base_ipc import IPCServer, run


class AnswerService(answers_pb2_grpc.AnswerServiceServicer):
    async def Unary(self, request: Any, context: Any) -> Any:
        return empty_pb2.Empty()

    def Stream(self, request: Any, context: Any) -> Iterator[Any]:
        yield replies_pb2.Reply(text='a')
        yield replies_pb2.Reply(text='b')
        yield empty_pb2.Empty()

    async def Nothing(self, request: Any, context: Any) -> Any:
        return empty_pb2.Empty()


class Relay:
    """Answers what its serializers take: the bytes of a reply (as a relay or a cache would), a dict."""

    async def echo(self, request: Any, context: Any) -> bytes:
        return echo_pb2.EchoReply(text=request.text).SerializeToString()

    async def echo_dict(self, request: Any, context: Any) -> dict[str, str]:
        return {'text': request.text}


def add_relay(relay: Relay, server: Any) -> None:
    handlers = {
        'Echo': grpc.unary_unary_rpc_method_handler(
            relay.echo, request_deserializer=echo_pb2.EchoRequest.FromString, response_serializer=bytes),
        'EchoSync': grpc.unary_unary_rpc_method_handler(
            relay.echo_dict, request_deserializer=echo_pb2.EchoRequest.FromString,
            response_serializer=lambda fields: echo_pb2.EchoReply(**fields).SerializeToString()),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('vyra.ipc.test.EchoService', handlers),))


async def main() -> None:
    server = IPCServer(sys.argv[1], servicers=[AnswerService()])
    server.add_servicer(Relay(), add_relay)
    await server.serve()


if __name__ == '__main__':
    run(main())
