"""Demo frontend process: calls the demo module's IPC server through
IPCHandler and prints the answers.

With ``--callable-calls N`` it also fires N concurrent ``callable`` commands,
each of which the IPC server answers by calling the module node's ROS 2
service; with ``--latency-calls N`` it prints the p50 round trip of one
trivial request over IPC and over a ROS 2 service, N calls each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Sequence

from vyra_base_ipc import IPCError, IPCHandler, resolve_socket_path
from vyra_base_ipc import backend_service_pb2 as backend_pb
from vyra_base_ipc import backend_service_pb2_grpc as backend_grpc
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc


async def call_callable_concurrently(module: IPCHandler, calls: int) -> None:
    """``calls`` concurrent ``ExecuteCommand('callable')``: each IPC handler
    calls the ROS 2 service and awaits it, none blocks another."""
    request = module_pb.CommandRequest(command='callable', parameters={'timeout': '5'})
    started = time.perf_counter()
    answers = await asyncio.gather(*(module.call_method('ExecuteCommand', request, timeout=10.0)
                                     for _ in range(calls)))
    elapsed = time.perf_counter() - started
    answered = sum(1 for answer in answers if answer.status_code == 0)
    print(f'{calls} concurrent ModuleService.ExecuteCommand("callable") calls, each calling the '
          f'ROS 2 service: {answered}/{calls} answered in {elapsed * 1000:.0f} ms, '
          f'e.g. {answers[0].result!r}')
    if answered != calls:
        failed = next(answer for answer in answers if answer.status_code != 0)
        raise RuntimeError(f'callable failed: status_code={failed.status_code} {failed.result!r}')


async def print_latency(socket_path: str | None, module_name: str | None, calls: int,
                        namespace: str) -> None:
    """Print the p50 of ``calls`` sequential ``ping`` commands over IPC and of
    as many calls of the ROS 2 ``callable`` service in ``namespace``."""
    from vyra_base_ipc.demo.latency import ipc_round_trips, p50, ros_round_trips

    ipc = p50(await ipc_round_trips(resolve_socket_path(socket_path, module_name=module_name),
                                    calls))
    ros = p50(await asyncio.to_thread(ros_round_trips, calls, namespace=namespace))
    print(f'latency, p50 of {calls} sequential calls each from this process: '
          f'IPC ExecuteCommand("ping") {ipc * 1000:.3f} ms | '
          f'ROS 2 std_srvs/Trigger "callable" {ros * 1000:.3f} ms | ROS 2/IPC {ros / ipc:.1f}x')


async def run(socket_path: str | None, module_name: str | None, *, callable_calls: int = 0,
              latency_calls: int = 0, namespace: str = '') -> None:
    """Call the demo module and print the answers, as the module docstring says.

    :raises IPCError: a call failed.
    :raises RuntimeError: a ``callable`` command did not succeed.
    """
    async with IPCHandler(socket_path, backend_grpc.BackendServiceStub, module_name=module_name,
                          timeout=2.0) as backend, \
            IPCHandler(socket_path, module_grpc.ModuleServiceStub, module_name=module_name,
                       timeout=2.0) as module:
        print(f'connected to {backend.socket_path} ({backend.lane_in_use} lane)')
        status = await backend.call_method('GetStatus', backend_pb.StatusRequest())
        print(f'BackendService.GetStatus -> status={status.status!r} '
              f'uptime_seconds={status.uptime_seconds:.3f}')
        processed = await backend.call_method('ProcessData', module_pb.DataRequest(data=b'hello vyra'))
        print(f'BackendService.ProcessData(b"hello vyra") -> {processed.result!r}')
        for name in ('ping', 'status', 'self_destruct'):
            answer = await module.call_method('ExecuteCommand', module_pb.CommandRequest(command=name))
            print(f'ModuleService.ExecuteCommand({name!r}) -> status_code={answer.status_code} '
                  f'result={answer.result!r}')
        data = await module.call_method('GetData', module_pb.DataRequest(key='status'))
        print(f'ModuleService.GetData("status") -> {json.loads(data.result)}')
        try:
            await module.call_method('GetData', module_pb.DataRequest(key='no_such_item'))
        except IPCError as error:
            print(f'ModuleService.GetData("no_such_item") -> {type(error).__name__}: {error}')
        if callable_calls:
            answer = await module.call_method('ExecuteCommand', module_pb.CommandRequest(
                command='callable', parameters={'timeout': '5'}))
            print(f'ModuleService.ExecuteCommand("callable") -> status_code={answer.status_code} '
                  f'result={answer.result!r}')
            if answer.status_code != 0:
                raise RuntimeError(f'callable failed: {answer.result}')
            await call_callable_concurrently(module, callable_calls)
    if latency_calls:
        await print_latency(socket_path, module_name, latency_calls, namespace)


def main(args: Sequence[str] | None = None) -> int:
    """The ``demo_frontend`` command (``args``: default ``sys.argv[1:]``); the
    exit status, 1 if a call failed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--socket-path')
    parser.add_argument('--module-name', default=None)
    parser.add_argument('--callable-calls', type=int, default=0, metavar='N',
                        help='also call "callable" (IPC -> ROS 2 service) once, then N times '
                        'concurrently (needs the ROS 2 demo)')
    parser.add_argument('--latency-calls', type=int, default=0, metavar='N',
                        help='also print the p50 of N calls over IPC and over the ROS 2 service')
    parser.add_argument('--ros-namespace', default='', help='namespace of the module node')
    options = parser.parse_args(args)
    module_name = options.module_name
    if options.socket_path is None and module_name is None:
        module_name = 'demo'
    try:
        asyncio.run(run(options.socket_path, module_name, callable_calls=options.callable_calls,
                        latency_calls=options.latency_calls, namespace=options.ros_namespace))
    except IPCError as error:
        print(f'IPC call failed: {error}')
        return 1
    except RuntimeError as error:
        print(f'demo failed: {error}')
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
