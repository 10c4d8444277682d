"""my_arm: an example VYRA module with its own IPC service.

- ``protos/my_arm/arm.proto``: the service, compiled at build time into
  ``my_arm.arm_pb2`` / ``arm_pb2_grpc`` by ``vyra_base_ipc_build``.
- :mod:`my_arm.arm_service`: the servicer.
- :mod:`my_arm.node`: the module's ROS 2 node, hosting the IPC server.
- :mod:`my_arm.arm_node`: the ``arm_node`` executable, which runs it (and takes
  stop signals before it imports rclpy).
- :mod:`my_arm.frontend`: a frontend process that calls it.
- :mod:`my_arm.web`: a web frontend (FastAPI) that calls it.
"""
