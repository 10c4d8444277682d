"""The demo module's ModuleService: the built-in commands plus ``callable``,
whose handler calls the module node's ROS 2 ``callable`` service
(``std_srvs/Trigger``) and returns its answer.

Load it into ``ipc_server`` with
``-p "servicers:=['vyra_base_ipc.demo.callable_service:DemoModuleService']"``;
being a ModuleService, it replaces the default one.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from std_srvs.srv import Trigger

from vyra_base_ipc.exceptions import CommandError, ServiceCallTimeout, ServiceUnavailable
from vyra_base_ipc.module_service import ModuleService, command
from vyra_base_ipc.ros_bridge import ServiceCaller

__all__ = ['DemoModuleService']


class DemoModuleService(ModuleService):
    """``ExecuteCommand('callable', {'timeout': seconds})`` calls the ROS 2
    service ``callable`` in the hosting node's namespace.

    The handler awaits the ROS response on the IPC event loop (never blocking
    the rclpy executor, which delivers the response), so any number of these
    IPC calls may be in flight; at most 10 ROS requests are (more would be
    dropped by the default service QoS), the others wait. Status codes: UNAVAILABLE when no ROS server
    appears within the timeout, DEADLINE_EXCEEDED when it does not answer,
    ABORTED when it answers ``success=False``, INVALID_ARGUMENT for a bad
    ``timeout``.
    """

    #: Seconds a ``callable`` command waits for the ROS 2 service by default.
    DEFAULT_TIMEOUT = 2.0

    def __init__(self) -> None:
        super().__init__('demo')
        self._callable: ServiceCaller | None = None

    def attach_ipc_host(self, host: Any) -> None:
        """Called by :class:`~vyra_base_ipc.node.IPCServerHost` before serving."""
        self.module_name = host.config.module_name
        self._callable = ServiceCaller(host.node.create_client(Trigger, 'callable'))

    @command('callable')
    async def call_callable(self, parameters: dict[str, str]) -> str:
        """Command ``callable``: the ROS 2 service's message, within
        ``timeout`` seconds (the status codes are in the class docstring)."""
        timeout = float(parameters.get('timeout', self.DEFAULT_TIMEOUT))
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f'timeout must be a finite number of seconds > 0, not {timeout}')
        if self._callable is None:
            raise CommandError('not hosted by a ROS 2 node', grpc.StatusCode.FAILED_PRECONDITION)
        try:
            response = await self._callable.call(Trigger.Request(), timeout)
        except (ServiceUnavailable, ServiceCallTimeout) as error:  # UNAVAILABLE, DEADLINE_EXCEEDED
            raise CommandError(error.details, error.code) from None
        if not response.success:
            raise CommandError(response.message, grpc.StatusCode.ABORTED)
        return str(response.message)
