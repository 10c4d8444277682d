"""The module's ROS 2 node: hosts the module's IPC server (ArmService and
the default ModuleService) on its own event-loop thread.

    ros2 run my_arm arm_node --ros-args -p module_name:=my_arm
"""

from __future__ import annotations

from typing import Sequence

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from vyra_base_ipc.node import IPCServerHost, spin_until_shutdown

from .arm_service import ArmService


class ArmNode(Node):
    """The arm's node; its IPC server follows the node's parameters
    (``module_name``, ``socket_path``, ...: see vyra_base_ipc's README)."""

    def __init__(self) -> None:
        super().__init__('arm_node')
        # Two steps, so that self.ipc exists even if start() raises:
        # rclpy.shutdown() calls destroy_node() on this node either way.
        self.ipc = IPCServerHost(self, [ArmService()])
        self.ipc.start()

    def destroy_node(self) -> None:
        """Stop the IPC server (with its grace period), then the node."""
        self.ipc.close()
        super().destroy_node()


def main(args: Sequence[str] | None = None) -> None:
    """Run the node until SIGINT, SIGTERM or ROS shutdown."""
    rclpy.init(args=None if args is None else list(args))  # (rclpy takes a list)
    executor = SingleThreadedExecutor()
    node = None
    try:
        node = ArmNode()
        executor.add_node(node)
        spin_until_shutdown(executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
