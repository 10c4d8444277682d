"""The module's ROS 2 node: hosts the module's IPC server (ArmService and
the default ModuleService) on its own event-loop thread.

    ros2 run my_arm arm_node --ros-args -p module_name:=my_arm
"""

from __future__ import annotations

from typing import Sequence

from rclpy.node import Node

from vyra_base_ipc.node import IPCServerHost, run_node

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


def main(args: Sequence[str] | None = None) -> int:
    """Run the node until SIGINT, SIGTERM or ROS shutdown. The signals only end
    the spin (run_node): a second one (a terminal's Ctrl-C under ros2 launch)
    cannot cut the IPC server's stop short."""
    return run_node(ArmNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
