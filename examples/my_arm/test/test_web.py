"""my_arm's web frontend (FastAPI) served by uvicorn, a real process on a Unix
socket, on asyncio's loop and on uvloop, calling the arm's node (a real ROS 2
process) over IPC."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import json
from pathlib import Path
import sys
import time

from arm_processes import FRAME_BYTES, Processes, StartNode, wait_until
import httpx
import pytest

from vyra_base_ipc import SyncIPCHandler
from vyra_base_ipc.introspection_pb2 import MethodStats, StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub

#: Starts the web frontend on an event loop ('asyncio' or 'uvloop') against a
#: node socket; returns an HTTP client of it.
StartWeb = Callable[[Path, str], httpx.Client]


@pytest.fixture
def start_web(ros_env: dict[str, str], socket_dir: Path, tmp_path: Path) -> Iterator[StartWeb]:
    """Start web frontends (``my_arm.web``, uvicorn serving its app); SIGINT at the end must stop
    each with status 0 (its lifespan closes the IPC client)."""
    webs = Processes(tmp_path)
    clients: list[httpx.Client] = []

    def start(node_socket: Path, loop: str) -> httpx.Client:
        web_socket = socket_dir / f'web-{len(clients)}.sock'
        start_web_process(webs, web_socket, node_socket, loop, ros_env)
        clients.append(web_client(web_socket))
        return clients[-1]

    try:
        yield start
    finally:
        for client in clients:
            client.close()
        webs.stop()


def start_web_process(processes: Processes, web_socket: Path, node_socket: Path, loop: str,
                      env: dict[str, str]) -> None:
    """Start the web frontend (``python -m my_arm.web``) serving ``web_socket``, calling ``node_socket``."""
    processes.start('web', [sys.executable, '-m', 'my_arm.web', '--uds', str(web_socket), '--loop', loop],
                    {**env, 'VYRA_IPC_SOCKET': str(node_socket)}, web_socket)


def web_client(web_socket: Path) -> httpx.Client:
    """An HTTP client of the web frontend on ``web_socket``."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(web_socket)), base_url='http://my-arm',
                        timeout=30)


def stats_of(node_socket: Path, method: str) -> list[MethodStats]:
    """The node's statistics of ``method`` (one entry per lane it was called on)."""
    with SyncIPCHandler(node_socket, IntrospectionStub, lane='ttrpc') as introspection:
        stats = introspection.call_method('GetStats', StatsRequest())
    return [entry for entry in stats.methods if entry.method.endswith(f'/{method}')]


@pytest.mark.parametrize('loop', ['asyncio', 'uvloop'])
def test_the_web_frontend_moves_streams_and_fetches(arm_socket: Path, start_web: StartWeb, loop: str) -> None:
    web = start_web(arm_socket, loop)

    moved = web.post('/move', json={'pose': 'ready'})
    assert (moved.status_code, moved.json()) == (200, {'pose': 'ready', 'reached': True})

    lines = web.get('/joints', params={'count': 3}).text.splitlines()
    assert [json.loads(line)['sequence'] for line in lines] == [0, 1, 2]

    frame = web.get('/frame')
    assert frame.status_code == 200 and len(frame.content) == FRAME_BYTES
    assert (frame.headers['x-width'], frame.headers['x-height'], frame.headers['x-lane']) == ('2048', '1024',
                                                                                             'ttrpc')


def test_a_refused_call_is_the_http_status_and_json_status_that_grpc_gateway_gives_it(
        arm_socket: Path, start_web: StartWeb) -> None:
    web = start_web(arm_socket, 'uvloop')
    refused = web.post('/move', json={'pose': 'dance'})
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body['code'] == 3  # INVALID_ARGUMENT
    assert "unknown pose 'dance'; known: home, ready, stow" in body['message']
    violation = {'field': 'pose', 'description': "'dance' is not one of: home, ready, stow"}
    assert body['details'] == [{'@type': 'type.googleapis.com/google.rpc.BadRequest',
                                'fieldViolations': [violation]}]

    # What the request message cannot hold is the browser's error: a count as FastAPI answers one that is
    # no number, a pose as grpc-gateway answers a body it cannot parse (before: 500 with a traceback
    # logged, protobuf's ValueError; for a count of 2**32 a reset connection).
    for count in (-1, 2**32):
        assert web.get('/joints', params={'count': count}).status_code == 422, count
    # JSON allows a lone surrogate; UTF-8, and so protobuf's strings, do not.
    lone = web.post('/move', content=b'{"pose": "\\ud800"}', headers={'content-type': 'application/json'})
    assert lone.status_code == 400, lone.text
    assert lone.json()['code'] == 3 and 'surrogates not allowed' in lone.json()['message']
    assert web.post('/move', json={'pose': 'home'}).status_code == 200


def test_a_web_frontend_started_before_the_node_answers_503_then_heals(
        start_arm_node: StartNode, start_web: StartWeb, socket_dir: Path) -> None:
    node_socket = socket_dir / 'later.sock'
    web = start_web(node_socket, 'uvloop')
    early = web.post('/move', json={'pose': 'home'})
    assert early.status_code == 503, early.text
    assert early.json()['code'] == 14 and str(node_socket) in early.json()['message']  # UNAVAILABLE
    assert early.json()['details'] == []

    start_arm_node(node_socket)
    moved = web.post('/move', json={'pose': 'home'})
    assert (moved.status_code, moved.json()) == (200, {'pose': 'home', 'reached': True}), moved.text


def test_a_browser_leaving_the_joint_stream_ends_it_on_the_node(arm_socket: Path,
                                                                start_web: StartWeb) -> None:
    web = start_web(arm_socket, 'uvloop')
    with web.stream('GET', '/joints', params={'count': 0}) as endless:  # 0: until the caller leaves
        lines = endless.iter_lines()
        assert [json.loads(next(lines))['sequence'] for _ in range(2)] == [0, 1]
        assert [entry.in_flight for entry in stats_of(arm_socket, 'WatchJoints')] == [1]

    # Closing the HTTP response ends the IPC stream and its handler on the node.
    wait_until(lambda: [entry.in_flight for entry in stats_of(arm_socket, 'WatchJoints')] == [0], 20,
               lambda: f'WatchJoints still running: {stats_of(arm_socket, "WatchJoints")}')


def test_an_endless_joint_stream_outlives_the_frontends_call_timeout(arm_socket: Path,
                                                                     start_web: StartWeb) -> None:
    from my_arm.web import CALL_TIMEOUT

    web = start_web(arm_socket, 'uvloop')
    with web.stream('GET', '/joints', params={'count': 0}) as endless:  # 0: until the caller leaves
        lines = endless.iter_lines()
        # It took the frontend's call timeout as its deadline: the node's stream failed
        # DEADLINE_EXCEEDED after 5 s, and the browser got a body cut off mid-stream.
        until = time.monotonic() + CALL_TIMEOUT * 1.5
        sequences = [json.loads(next(lines))['sequence']]
        while time.monotonic() < until:
            sequences.append(json.loads(next(lines))['sequence'])
    assert sequences == list(range(len(sequences)))


def test_stopping_the_web_frontend_while_a_browser_watches_the_joints_ends_the_stream_and_the_process(
        arm_socket: Path, ros_env: dict[str, str], socket_dir: Path, tmp_path: Path) -> None:
    web_socket = socket_dir / 'web.sock'
    webs = Processes(tmp_path)
    try:
        start_web_process(webs, web_socket, arm_socket, 'uvloop', ros_env)
        with web_client(web_socket) as web, web.stream('GET', '/joints', params={'count': 0}) as endless:
            lines = endless.iter_lines()
            assert [json.loads(next(lines))['sequence'] for _ in range(2)] == [0, 1]
            # SIGINT with the stream still open: the process must exit 0 (within 20 s). uvicorn waits
            # for open responses to end, and an endless stream never did: the frontend ran on until
            # the browser left (or a second Ctrl-C, which skipped the lifespan's disconnect).
            webs.stop()
    finally:
        webs.stop()
    wait_until(lambda: [entry.in_flight for entry in stats_of(arm_socket, 'WatchJoints')] == [0], 20,
               lambda: f'WatchJoints still running: {stats_of(arm_socket, "WatchJoints")}')
