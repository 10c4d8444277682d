"""What a handler answers is checked against its method's response type
(``_checked_answers``) on both lanes, in a real server process.

- also for a service whose messages all come from other proto files
  (``google.protobuf.Empty``, another package): its ``_pb2_grpc`` module
  does not import its own ``_pb2``, whose methods the check looks up; the
  check did nothing for it, and a wrong answer went out as the response
  (nor did its client check the type of its requests);
- not for a method whose add function gave a serializer of its own (bytes
  passed through, a dict made into the message): that serializer says what
  it takes; such methods failed UNKNOWN "returned a bytes, not a ...".
"""

from __future__ import annotations

import os
from pathlib import Path
import sys
from typing import Any

import grpc
import pytest

from conftest import LANES, ServerProcess, StartServer, compile_protos
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler

ANSWERS = """syntax = "proto3";
package vyra.ipc.test.answers;
import "google/protobuf/empty.proto";
import "answers/replies.proto";
service AnswerService {
  rpc Unary(google.protobuf.Empty) returns (vyra.ipc.test.replies.Reply);
  rpc Stream(google.protobuf.Empty) returns (stream vyra.ipc.test.replies.Reply);
  rpc Nothing(google.protobuf.Empty) returns (google.protobuf.Empty);
}
"""
REPLIES = """syntax = "proto3";
package vyra.ipc.test.replies;
message Reply { string text = 1; }
"""


@pytest.fixture(scope='module')
def answers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two protos, generated and importable (``answers``)."""
    root = tmp_path_factory.mktemp('answer_protos')
    (root / 'protos' / 'answers').mkdir(parents=True)
    (root / 'protos' / 'answers' / 'answers.proto').write_text(ANSWERS)
    (root / 'protos' / 'answers' / 'replies.proto').write_text(REPLIES)
    compile_protos(root / 'protos', root / 'out')
    sys.path.insert(0, str(root / 'out'))
    return root / 'out'


@pytest.fixture
def server(start_server: StartServer, socket_path: Path, child_env: dict[str, str], answers: Path) -> ServerProcess:
    env = {'PYTHONPATH': os.pathsep.join([str(answers), child_env['PYTHONPATH']])}
    return start_server(socket_path, script='answer_server.py', env=env, wait=False).wait_serving(ttrpc=True)


def stub() -> Any:
    from answers import answers_pb2_grpc  # (as a client imports it: not answers_pb2)
    return answers_pb2_grpc.AnswerServiceStub


def empty() -> Any:
    from google.protobuf import empty_pb2
    return empty_pb2.Empty()


@pytest.mark.parametrize('lane', LANES)
def test_a_wrong_answer_of_a_service_whose_messages_come_from_other_files_is_refused(
        server: ServerProcess, echo: Any, lane: str) -> None:
    with SyncIPCHandler(server.socket_path, stub(), lane=lane) as ipc:
        # (its client checks requests too)
        with pytest.raises(TypeError, match='takes a google.protobuf.Empty request'):
            ipc.call_method('Unary', echo.pb.EchoRequest())
        with pytest.raises(IPCRemoteError) as refused:
            ipc.call_method('Unary', empty())
        assert (refused.value.code, refused.value.details) == (
            grpc.StatusCode.UNKNOWN, "Unexpected <class 'TypeError'>: the handler of "
            '/vyra.ipc.test.answers.AnswerService/Unary returned google.protobuf.Empty, not a '
            'vyra.ipc.test.replies.Reply')
        received = []
        with pytest.raises(IPCRemoteError) as refused:
            for reply in ipc.stream_method('Stream', empty()):
                received.append(reply.text)
        assert received == ['a', 'b']  # the messages before it came
        assert (refused.value.code, refused.value.details) == (
            grpc.StatusCode.UNKNOWN, "Unexpected <class 'TypeError'>: the handler of "
            '/vyra.ipc.test.answers.AnswerService/Stream yielded google.protobuf.Empty, not a '
            'vyra.ipc.test.replies.Reply')
        assert ipc.call_method('Nothing', empty()) == empty()  # a well-known type as the right answer


@pytest.mark.parametrize('lane', LANES)
def test_an_answer_for_a_serializer_of_the_handlers_own_is_left_to_it(server: ServerProcess, echo: Any,
                                                                      lane: str) -> None:
    with SyncIPCHandler(server.socket_path, echo.Stub, lane=lane) as ipc:
        assert ipc.call_method('Echo', echo.pb.EchoRequest(text='bytes')).text == 'bytes'
        assert ipc.call_method('EchoSync', echo.pb.EchoRequest(text='dict')).text == 'dict'
