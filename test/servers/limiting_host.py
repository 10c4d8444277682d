"""A module node that hosts its IPC server and has a pre-set parameter
callback of its own, as rclpy's demos write one: ``speed`` is limited to
10.0 before rclpy checks and sets it. For test_node.py: ``own-first`` adds
that callback before the IPCServerHost is made, ``host-first`` after.
Parameters as for ``ipc_server``; the node is ``arm_node``."""

from __future__ import annotations

import sys
from typing import Any

from rclpy.node import Node
from rclpy.parameter import Parameter

from vyra_base_ipc.node import IPCServerHost, run_node

SPEED_LIMIT = 10.0


def limit_speed(parameters: list[Parameter[Any]]) -> list[Parameter[Any]]:
    return [Parameter('speed', value=min(float(parameter.value), SPEED_LIMIT)) if parameter.name == 'speed'
            else parameter for parameter in parameters]


class ArmNode(Node):
    def __init__(self, order: str) -> None:
        super().__init__('arm_node')
        self.declare_parameter('speed', 1.0)
        if order == 'own-first':
            self.add_pre_set_parameters_callback(limit_speed)
        self.ipc = IPCServerHost(self, module_name='arm')
        if order == 'host-first':
            self.add_pre_set_parameters_callback(limit_speed)
        self.ipc.start()

    def destroy_node(self) -> None:
        self.ipc.close()
        super().destroy_node()


if __name__ == '__main__':
    order = sys.argv[1]
    raise SystemExit(run_node(lambda: ArmNode(order), sys.argv))
