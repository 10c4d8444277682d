"""An rclpy client of the echo service (``test_msgs/srv/BasicTypes``, payload
in ``string_value``), spinning its own single-threaded executor per call:
the fastest way rclpy offers to wait for one response."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ['RclpyDriver', 'RclpyTriggerDriver']

#: ``wait_for_service`` and per-call limit, in seconds.
_TIMEOUT = 30.0


class RclpyDriver:
    """One node with one client, in a private rclpy context."""

    asynchronous = False

    def __init__(self, addresses: dict[str, Any], transport: dict[str, Any]) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from test_msgs.srv import BasicTypes

        self._rclpy = rclpy
        self._executor_class = SingleThreadedExecutor
        self._type = BasicTypes
        self._service = addresses['ros']
        self._context: Any = None
        self._setup()

    def _setup(self) -> None:
        """Subclasses choose another service here."""

    def open(self) -> None:
        rclpy = self._rclpy
        self._context = rclpy.Context()
        rclpy.init(context=self._context)
        self._node = rclpy.create_node('vyra_bench_client', context=self._context)
        self._client = self._node.create_client(self._type, self._service)
        if not self._client.wait_for_service(timeout_sec=_TIMEOUT):
            raise RuntimeError(f'ROS 2 service {self._service} not discovered in {_TIMEOUT} s')
        self._executor = self._executor_class(context=self._context)
        self._executor.add_node(self._node)

    def close(self) -> None:
        if self._context is None:
            return
        self._executor.shutdown()
        self._node.destroy_node()
        self._rclpy.try_shutdown(context=self._context)
        self._context = None

    def _request(self, payload: bytes) -> Any:
        # A ROS string carries the payload: its bytes are ASCII, so the
        # length in characters is the length in bytes on the wire.
        return self._type.Request(string_value=payload.decode('ascii'))

    def echo(self, payload: bytes) -> Callable[[], int]:
        request = self._request(payload)
        call_async = self._client.call_async
        spin = self._executor.spin_until_future_complete

        def call() -> int:
            future = call_async(request)
            spin(future, timeout_sec=_TIMEOUT)
            if not future.done():
                raise TimeoutError(f'no reply from {self._service} within {_TIMEOUT} s')
            return len(future.result().string_value)
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        future = self._client.call_async(self._request(payload))
        self._executor.spin_until_future_complete(future, timeout_sec=_TIMEOUT)
        if not future.done():
            raise TimeoutError(f'no reply from {self._service} within {_TIMEOUT} s')
        return future.result().string_value.encode('ascii')


class RclpyTriggerDriver(RclpyDriver):
    """A ``std_srvs/Trigger`` call: the smallest ROS 2 service call, carrying
    no payload (its row is measured with 0 bytes). The fast lane's latency
    target is relative to it."""

    def _setup(self) -> None:
        from std_srvs.srv import Trigger

        from ..servers import ROS_TRIGGER_SERVICE

        self._type = Trigger
        self._service = ROS_TRIGGER_SERVICE

    def _request(self, payload: bytes) -> Any:
        if payload:
            raise ValueError('a Trigger call carries no payload')
        return self._type.Request()

    def echo(self, payload: bytes) -> Callable[[], int]:
        call_async = self._client.call_async
        spin = self._executor.spin_until_future_complete
        request = self._request(payload)

        def call() -> int:
            future = call_async(request)
            spin(future, timeout_sec=_TIMEOUT)
            if not future.done() or not future.result().success:
                raise TimeoutError(f'no successful reply from {self._service} within {_TIMEOUT} s')
            return 0
        return call

    def roundtrip(self, payload: bytes) -> bytes:
        self.echo(payload)()
        return b''
