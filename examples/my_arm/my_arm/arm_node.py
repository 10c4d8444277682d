"""The ``arm_node`` executable (console script ``arm_node = my_arm.arm_node:main``):
runs the module's node, :class:`my_arm.node.ArmNode`, which hosts the module's
IPC server.

    ros2 run my_arm arm_node --ros-args -p module_name:=my_arm

This module imports nothing heavy: :func:`main` takes SIGINT, SIGTERM and
SIGHUP first, then imports rclpy, gRPC and the node (most of a second). A stop
signal in that time (Ctrl-C just after ``ros2 run``, or a launch stopping the
node because another one failed at start) otherwise ends it with a
``KeyboardInterrupt`` traceback (exit status -2) or kills it (-15, -1); noted,
it ends the node quietly with status 0, as it does once the node spins. Keep
the node, and every import of rclpy, grpc or vyra_base_ipc, out of this module
(``python -m my_arm.arm_node`` runs it the same way).
"""

from __future__ import annotations

from typing import Sequence

# A module of the standard library's signal alone: imported before the signals are taken.
from vyra_base_ipc_server import note_stop_signals


def main(args: Sequence[str] | None = None) -> int:
    """Run the node until SIGINT, SIGTERM, SIGHUP or ROS shutdown; exit status
    0, or 2 after logging an unusable parameter. The signals only end the spin
    (run_node): a second one (a terminal's Ctrl-C under ros2 launch) cannot cut
    the IPC server's stop short, and one that came while this still imported
    ends it at once with 0, without starting ROS."""
    received = note_stop_signals()
    # Only now (see the module's docstring).
    from vyra_base_ipc.node import run_node

    from .node import ArmNode

    return run_node(ArmNode, args, received=received)


if __name__ == '__main__':
    raise SystemExit(main())
