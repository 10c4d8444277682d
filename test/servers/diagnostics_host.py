"""A module node that hosts its IPC server (``host_ipc_server``), for
test_diagnostics.py: on SIGUSR1 it stops the IPC server and keeps running,
as a node whose server failed would. Parameters as for ``ipc_server``."""

from __future__ import annotations

import signal
import sys
import threading

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from vyra_base_ipc.node import host_ipc_server, spin_until_shutdown


class ArmNode(Node):
    def __init__(self) -> None:
        super().__init__('arm_node')
        self.ipc = host_ipc_server(self)
        self.stop_requested = threading.Event()
        self.create_timer(0.05, self.check)

    def check(self) -> None:
        if self.stop_requested.is_set() and self.ipc.server is not None and self.ipc.server.is_serving:
            self.ipc.stop(0.0)
            print('IPC server stopped on request', flush=True)

    def destroy_node(self) -> None:
        self.ipc.close()
        super().destroy_node()


def main() -> None:
    rclpy.init(args=sys.argv)
    node = ArmNode()
    signal.signal(signal.SIGUSR1, lambda *_: node.stop_requested.set())
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        spin_until_shutdown(executor)
    finally:
        executor.shutdown(timeout_sec=0)
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
