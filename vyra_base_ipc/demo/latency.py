"""Round-trip times of one trivial request, over IPC and over a ROS 2 service.

Both sides are measured the same way: sequential calls from this process,
after a warm-up, each timed with ``time.perf_counter``. IPC: ModuleService
``ExecuteCommand('ping')`` (answer ``pong``) through :class:`IPCHandler`.
ROS 2: ``std_srvs/Trigger`` on the module node's ``callable`` service
through an rclpy client, as a module would call it.
"""

from __future__ import annotations

import statistics
import time

from vyra_base_ipc import IPCHandler
from vyra_base_ipc import module_service_pb2 as module_pb
from vyra_base_ipc import module_service_pb2_grpc as module_grpc
from vyra_base_ipc.address import StrPath

__all__ = ['WARMUP_CALLS', 'ipc_round_trips', 'p50', 'ros_round_trips']

#: Calls made before measuring (connection set-up, discovery, caches).
WARMUP_CALLS = 20


def p50(samples: list[float]) -> float:
    """The median, in the samples' unit."""
    return statistics.median(samples)


async def ipc_round_trips(socket_path: StrPath, calls: int) -> list[float]:
    """Seconds per ``ExecuteCommand('ping')`` over IPC, ``calls`` samples.

    :raises IPCError: a call failed.
    :raises RuntimeError: the answer was not ``pong``.
    """
    request = module_pb.CommandRequest(command='ping')
    samples: list[float] = []
    async with IPCHandler(socket_path, module_grpc.ModuleServiceStub, timeout=5.0) as ipc:
        for index in range(WARMUP_CALLS + calls):
            started = time.perf_counter()
            answer = await ipc.call_method('ExecuteCommand', request)
            elapsed = time.perf_counter() - started
            if answer.result != 'pong':
                raise RuntimeError(f'ping answered {answer.result!r}')
            if index >= WARMUP_CALLS:
                samples.append(elapsed)
    return samples


def ros_round_trips(calls: int, service: str = 'callable', *, namespace: str = '',
                    wait_for_service: float = 20.0, timeout: float = 5.0) -> list[float]:
    """Seconds per ``std_srvs/Trigger`` call of ``service``, ``calls`` samples.

    Creates and shuts down its own rclpy context (no signal handlers), so it
    can run in a process that uses rclpy for nothing else.

    :raises RuntimeError: the service did not appear, a call timed out, or
        answered ``success=False``.
    """
    import rclpy
    from rclpy.client import Client
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from std_srvs.srv import Trigger

    context = Context()
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = rclpy.create_node('demo_latency', namespace=namespace or None, context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        client: Client[Trigger.Request, Trigger.Response] = node.create_client(Trigger, service)
        if not client.wait_for_service(timeout_sec=wait_for_service):
            raise RuntimeError(f'ROS 2 service {client.service_name} did not appear '
                               f'within {wait_for_service:g} s')
        samples: list[float] = []
        for index in range(WARMUP_CALLS + calls):
            started = time.perf_counter()
            future = client.call_async(Trigger.Request())
            executor.spin_until_future_complete(future, timeout_sec=timeout)
            elapsed = time.perf_counter() - started
            if not future.done():
                client.remove_pending_request(future)
                raise RuntimeError(f'ROS 2 service {client.service_name} did not answer '
                                   f'within {timeout:g} s')
            response = future.result()
            if response is None or not response.success:
                raise RuntimeError(f'ROS 2 service {client.service_name} failed: {response}')
            if index >= WARMUP_CALLS:
                samples.append(elapsed)
        executor.shutdown(timeout_sec=0)
        node.destroy_node()
        return samples
    finally:
        rclpy.try_shutdown(context=context)
