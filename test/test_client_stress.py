"""The clients under concurrency: many threads or tasks on one handler, with
disconnect() and cancellation racing their calls. Every answer belongs to
its own call; every failure is a documented error; the process survives.

Bounded: each test makes a few hundred calls against one server process."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import LONG, ServerProcess

#: A process whose four threads call Echo on one SyncIPCHandler (lane argv[2],
#: server argv[1]) while its main thread disconnects that handler 300 times;
#: prints (JSON) what the calls ended with (each may have failed: a connect can
#: take longer than the 1 ms between disconnects), the answers that were not
#: their own call's, and the answer to one more call.
CALLS_RACING_DISCONNECT = """
import json, sys, threading
from vyra_base_ipc import IPCUnavailableError, SyncIPCHandler
from vyra_ipc_test import echo_pb2, echo_pb2_grpc

ipc = SyncIPCHandler(sys.argv[1], echo_pb2_grpc.EchoServiceStub, lane=sys.argv[2], timeout=10)
stop = threading.Event()
outcomes, wrong = set(), []

def calls(index):
    for round_ in range(100_000):
        if stop.is_set():
            return
        token = f'{index}.{round_}'
        try:
            text = ipc.call_method('Echo', echo_pb2.EchoRequest(text=token)).text
        except IPCUnavailableError as error:
            outcomes.add('closed' if 'was closed' in str(error) else str(error))
        else:
            outcomes.add('answered')
            if text != token:
                wrong.append((token, text))
threads = [threading.Thread(target=calls, args=(index,)) for index in range(4)]
for thread in threads:
    thread.start()
for _ in range(300):
    stop.wait(0.001)
    ipc.disconnect()
stop.set()
for thread in threads:
    thread.join()
print(json.dumps({'outcomes': sorted(outcomes), 'wrong': wrong,
                  'last': ipc.call_method('Echo', echo_pb2.EchoRequest(text='last')).text}))
ipc.disconnect()
"""


def test_sync_calls_racing_disconnect_on_the_grpc_lane_answer_or_fail_as_closed(
        server: ServerProcess, child_env: dict[str, str]) -> None:
    # Found: the process died of SIGSEGV within a second. A thread's first
    # call on a channel made grpc (1.85) make the method's callable, which
    # crashes on a channel that disconnect() in another thread had closed.
    result = subprocess.run([sys.executable, '-c', CALLS_RACING_DISCONNECT, str(server.socket_path), 'grpc'],
                            capture_output=True, text=True, timeout=LONG, env=child_env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report['outcomes']) <= {'answered', 'closed'} and report['wrong'] == [], report
    assert report['last'] == 'last'  # (and the handler still works)
