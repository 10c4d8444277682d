"""The clients in rclpy callbacks: a real node on a MultiThreadedExecutor with
a ReentrantCallbackGroup, its service and timer callbacks calling a real
server process, and an ``async def`` callback (which rclpy runs without an
asyncio loop) given an IPCHandler by mistake."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from std_srvs.srv import Trigger

from conftest import ServerProcess, in_flight, wait_for
from vyra_base_ipc import IPCError, IPCHandler, IPCUnavailableError, SyncIPCHandler

#: Callbacks that block in an IPC call at once (below rclpy's service queue depth of 10).
HELD = 4
SLEEP = '/vyra.ipc.test.EchoService/Sleep'


@pytest.fixture
def spin_threads(context: Context) -> Iterator[Callable[..., MultiThreadedExecutor]]:
    """``spin_threads(*nodes)``: a MultiThreadedExecutor spinning them on a thread; stopped at teardown."""
    spun: list[tuple[MultiThreadedExecutor, threading.Thread]] = []

    def start(*nodes: Node) -> MultiThreadedExecutor:
        executor = MultiThreadedExecutor(num_threads=HELD + 2, context=context)
        for node in nodes:
            executor.add_node(node)
        thread = threading.Thread(target=executor.spin, daemon=True)
        thread.start()
        spun.append((executor, thread))
        return executor

    yield start
    for executor, thread in spun:
        executor.shutdown(timeout_sec=10)
        thread.join(timeout=10)
        assert not thread.is_alive()


def requests(caller: Node, name: str, count: int) -> list[Any]:
    client = caller.create_client(Trigger, name)
    assert client.wait_for_service(timeout_sec=20), f'{name} did not appear'
    return [client.call_async(Trigger.Request()) for _ in range(count)]


def answers(futures: list[Any]) -> list[Any]:
    wait_for(lambda: all(future.done() for future in futures), 30, 'the service callbacks to answer')
    return [future.result() for future in futures]


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_one_sync_handler_serves_concurrent_service_and_timer_callbacks(
        context: Context, spin_threads: Callable[..., MultiThreadedExecutor], server: ServerProcess,
        echo: Any, lane: str) -> None:
    class Frontend(Node):
        def __init__(self) -> None:
            super().__init__('frontend', context=context)
            self.ipc = SyncIPCHandler(server.socket_path, echo.Stub, timeout=30, lane=lane)
            group = ReentrantCallbackGroup()
            self.create_service(Trigger, 'echo', self.echo, callback_group=group)
            self.create_service(Trigger, 'hold', self.hold, callback_group=group)
            self.ticks: list[str] = []
            self.create_timer(0.01, self.tick, callback_group=group)

        def echo(self, request: Any, response: Any) -> Any:
            text = f'thread {threading.get_ident()}'
            items = [reply.index for reply in self.ipc.stream_method('Count', echo.pb.CountRequest(count=5))]
            response.message = self.ipc.call_method('Echo', echo.pb.EchoRequest(text=text)).text
            response.success = response.message == text and items == [0, 1, 2, 3, 4]
            return response

        def hold(self, request: Any, response: Any) -> Any:
            try:
                self.ipc.call_method('Sleep', echo.pb.SleepRequest(seconds=60))  # until disconnect()
            except IPCError as error:
                response.message = type(error).__name__
            return response

        def tick(self) -> None:
            try:
                self.ticks.append(self.ipc.call_method('Echo', echo.pb.EchoRequest(text='tick')).text)
            except IPCUnavailableError:  # one in flight at disconnect(): closed, as the held ones
                pass

    frontend, caller = Frontend(), Node('caller', context=context)
    executor: MultiThreadedExecutor | None = None
    try:
        executor = spin_threads(frontend, caller)
        assert all(answer.success for answer in answers(requests(caller, 'echo', 10)))

        # The shared handler does not serialize its callers: HELD callbacks wait in the server at once,
        # and disconnect() from another thread fails each of them as closed.
        held = requests(caller, 'hold', HELD)
        wait_for(lambda: in_flight(server, lane, SLEEP) == HELD, 30, f'{HELD} Sleep calls in the server')
        frontend.ipc.disconnect()
        assert [answer.message for answer in answers(held)] == [IPCUnavailableError.__name__] * HELD

        ticks = len(frontend.ticks)
        wait_for(lambda: len(frontend.ticks) > ticks, 20, 'the timer to call again after disconnect()')
        assert set(frontend.ticks) == {'tick'}
        assert all(answer.success for answer in answers(requests(caller, 'echo', 10)))
    finally:
        # The callbacks end first: a tick after the disconnect below would connect again, and the
        # handler, collected connected, warned "unclosed SyncIPCHandler" in whatever test ran then.
        if executor is not None:
            executor.shutdown(timeout_sec=10)
        frontend.ipc.disconnect()
        caller.destroy_node()
        frontend.destroy_node()


def test_an_ipc_handler_awaited_in_an_async_rclpy_callback_says_to_use_the_sync_handler(
        context: Context, spin_threads: Callable[..., MultiThreadedExecutor], server: ServerProcess,
        echo: Any) -> None:
    """An rclpy executor runs ``async def`` callbacks without an asyncio loop: the call fails
    at once, saying what to use (it said only "no running event loop")."""
    ipc = IPCHandler(server.socket_path, echo.Stub)

    async def ask(request: Any, response: Any) -> Any:
        try:
            await ipc.call_method('Echo', echo.pb.EchoRequest(text='hello'))
        except RuntimeError as error:
            response.message = str(error)
        return response

    frontend, caller = Node('frontend', context=context), Node('caller', context=context)
    try:
        frontend.create_service(Trigger, 'ask', ask, callback_group=ReentrantCallbackGroup())
        spin_threads(frontend, caller)
        [answer] = answers(requests(caller, 'ask', 1))
        assert 'IPCHandler needs a running asyncio event loop' in answer.message
        assert 'use SyncIPCHandler' in answer.message
        assert not ipc.is_connected
    finally:
        caller.destroy_node()
        frontend.destroy_node()
