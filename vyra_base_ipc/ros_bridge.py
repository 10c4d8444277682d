"""Calling ROS 2 services from asyncio code, e.g. from an IPC handler.

A synchronous ``Client.call()`` inside a callback deadlocks when the only
thread that could deliver the response is the one waiting, and an rclpy
future cannot be awaited by asyncio. :func:`call_service` sends the request
with ``call_async`` and waits for the response on the *asyncio* side: the
response is delivered by whatever executor spins the client's node (on its
own thread), which hands it over with ``call_soon_threadsafe``.

Concurrency has a limit that ROS 2 does not report: service requests and
responses are kept in a history of ``depth`` entries (10 by default), and
requests beyond that which arrive while the server is busy are dropped
silently; the caller only sees its timeout. :class:`ServiceCaller` keeps the
number of requests in flight below that depth and queues the rest.
"""

from __future__ import annotations

import asyncio
import math
from numbers import Real
from typing import Any

import grpc
from rclpy.client import Client
from rclpy.qos import HistoryPolicy
from rclpy.task import Future as RosFuture

from ._deadline import within
from .exceptions import ServiceCallTimeout, ServiceUnavailable

# ServiceCallTimeout and ServiceUnavailable are defined in .exceptions,
# importable from here too.
__all__ = ['ServiceCallTimeout', 'ServiceCaller', 'ServiceUnavailable', 'call_service']


async def call_service(client: Client[Any, Any], request: Any, timeout: float, *,
                       wait_for_service: bool = True) -> Any:
    """Call a ROS 2 service from a coroutine and return its response.

    Must run on an asyncio loop that is not the thread spinning ``client``'s
    node; the node must be spun by an executor (on another thread) for the
    response to arrive. Many calls may be in flight at once.

    :param timeout: seconds for the whole call, including waiting for the
        service to appear when ``wait_for_service`` is true (0 or less: no
        time to wait; ``math.inf``: no limit).
    :param wait_for_service: poll for the service server within the deadline
        instead of sending a request nobody may receive.
    :raises ServiceUnavailable: no server appeared within ``timeout``.
    :raises ServiceCallTimeout: no response within ``timeout``; the request is
        withdrawn (a late response is dropped).
    :raises TypeError, ValueError: ``timeout`` is not a number of seconds
        (``None``, NaN), before anything is sent.
    :raises Exception: what the rclpy future reports, if it fails.
    """
    timeout = _seconds(timeout)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    if wait_for_service:
        while not client.service_is_ready():
            if loop.time() >= give_up:
                raise ServiceUnavailable(
                    grpc.StatusCode.UNAVAILABLE,
                    f'ROS 2 service {client.service_name} is not available (waited {timeout:g} s)')
            await asyncio.sleep(min(0.02, max(0.0, give_up - loop.time())))
    answer: asyncio.Future[Any] = loop.create_future()

    def deliver(ros_future: RosFuture[Any]) -> None:
        # Runs on the executor's thread (or here, if already done).
        try:
            loop.call_soon_threadsafe(_transfer, ros_future, answer)
        except RuntimeError:  # the asyncio loop is closed: nobody waits any more
            pass

    ros_future = client.call_async(request)
    ros_future.add_done_callback(deliver)
    try:
        return await within(answer, give_up - loop.time())
    except TimeoutError:
        raise ServiceCallTimeout(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f'ROS 2 service {client.service_name} did not answer within {timeout:g} s') from None
    finally:
        if not ros_future.done():
            client.remove_pending_request(ros_future)
            ros_future.cancel()


class ServiceCaller:
    """Calls one ROS 2 service from asyncio code with at most ``max_in_flight``
    requests outstanding; further calls wait their turn (within their timeout).

    :param client: the rclpy client; its node must be spun on another thread.
    :param max_in_flight: default: the client's QoS history depth (10 for the
        default service QoS), which the server's depth should match.
    :raises TypeError: ``max_in_flight`` is not an int.
    :raises ValueError: ``max_in_flight`` below 1.
    """

    def __init__(self, client: Client[Any, Any], max_in_flight: int | None = None) -> None:
        if max_in_flight is None:
            profile = client.qos_profile
            keep_last = profile.history != HistoryPolicy.KEEP_ALL and profile.depth > 0
            max_in_flight = profile.depth if keep_last else 10
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
            raise TypeError(f'max_in_flight must be an int, not {type(max_in_flight).__name__}')
        if max_in_flight < 1:
            raise ValueError(f'max_in_flight must be at least 1, not {max_in_flight}')
        self.client = client
        self.max_in_flight = max_in_flight
        # Bound to the loop of its first use.
        self._slots = asyncio.Semaphore(max_in_flight)

    async def call(self, request: Any, timeout: float) -> Any:
        """:func:`call_service`, the wait for a free slot included in ``timeout``.

        :raises ServiceUnavailable, ServiceCallTimeout, TypeError, ValueError:
            as :func:`call_service`.
        """
        timeout = _seconds(timeout)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        try:
            await within(self._slots.acquire(), timeout)
        except TimeoutError:
            raise ServiceCallTimeout(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f'ROS 2 service {self.client.service_name}: {self.max_in_flight} calls in flight, '
                f'none finished within {timeout:g} s') from None
        try:
            return await call_service(self.client, request, max(0.0, give_up - loop.time()))
        finally:
            self._slots.release()


def _seconds(timeout: object) -> float:
    """``timeout`` as a float, checked: a NaN waited for ever, polling for the
    service without pause (``loop.time() >= now + nan`` is never true).

    :raises TypeError: not a real number (``None``, a ``bool``, a string).
    :raises ValueError: NaN.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, Real):
        raise TypeError(f'timeout must be a number of seconds, not {type(timeout).__name__}')
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError('timeout must be a number of seconds, not nan')
    return seconds


def _transfer(ros_future: RosFuture[Any], answer: asyncio.Future[Any]) -> None:
    if answer.done():
        return
    if ros_future.cancelled():
        answer.cancel()
        return
    error = ros_future.exception()
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(ros_future.result())
