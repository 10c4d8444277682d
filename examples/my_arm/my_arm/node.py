"""The module's ROS 2 node: hosts the module's IPC server (ArmService and
the default ModuleService) on its own event-loop thread. The ``arm_node``
executable (:mod:`my_arm.arm_node`) runs it; it imports this module only
once it has taken the stop signals.
"""

from __future__ import annotations

from rclpy.node import Node

from vyra_base_ipc.node import IPCServerHost

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
