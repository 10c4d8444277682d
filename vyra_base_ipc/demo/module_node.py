"""The demo module's own ROS 2 node: offers the module's ``Callable``, a
``std_srvs/Trigger`` service named ``callable`` (relative, so it follows the
node's namespace). Runs until SIGINT, SIGTERM or ROS shutdown, then exits 0.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from std_srvs.srv import Trigger

from vyra_base_ipc.node import run_node

__all__ = ['DECLARED_PARAMETERS', 'DemoModuleNode', 'main']

#: The parameters this node declares (checked against the launch files).
DECLARED_PARAMETERS = frozenset({'module_name'})


class DemoModuleNode(Node):
    """Answers ``callable`` with ``success=True`` and which call it was."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('demo_module', **kwargs)
        self.module_name: str = self.declare_parameter(
            'module_name', 'demo',
            ParameterDescriptor(description='Name of the VYRA module this node belongs to.',
                                read_only=True)).value
        self._calls = 0
        self._lock = threading.Lock()
        self.create_service(Trigger, 'callable', self._on_callable)
        self.get_logger().info(f'module {self.module_name!r} offers {self.resolve_service_name("callable")}')

    def _on_callable(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self._calls += 1
            number = self._calls
        response.success = True
        response.message = f'{self.module_name} callable: call {number}'
        return response


def main(args: Sequence[str] | None = None, *, received: list[str] | None = None) -> int:
    """The ``demo_module_node`` command: spin the node until SIGINT, SIGTERM
    or ROS shutdown; exit status 0. The signals only end the spin
    (:func:`~vyra_base_ipc.node.run_node`): a second one, as a terminal's
    Ctrl-C sends under ``ros2 launch``, cannot interrupt the shutdown.

    :param received: the list into which the console script's entry point
        (:mod:`vyra_base_ipc_server.demo_module_node`) noted stop signals
        while this module imported: if one came, it exits 0 at once."""
    return run_node(DemoModuleNode, args, received=received)


if __name__ == '__main__':
    raise SystemExit(main())
