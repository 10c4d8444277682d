"""Start a VYRA module: its ROS 2 node and its IPC server.

    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=arm namespace:=/robot1 \
        module_package:=my_arm module_executable:=arm_node host_ipc:=true
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=arm \
        module_package:=my_arm module_executable:=arm_node servicers:="['my_arm.arm_service:ArmService']"

The IPC server runs as a node of its own, ``ipc_server`` (default), or inside
the module's node (``host_ipc:=true``, for a node that calls
``vyra_base_ipc.node.host_ipc_server``; then no ``ipc_server`` is started).
The node that serves IPC gets this package's ``config/ipc_server.yaml``
(key ``/**``: any node name and namespace), ``module_name`` and, if given,
``servicers``; its socket comes from those parameters (by default
``/tmp/<module_name>_ipc.sock``). The module's node always gets ``module_name``.

Every process is required: when one exits while the launch runs (e.g.
``ipc_server`` with status 2 on an unusable parameter, or the module's node
crashing), the launch stops the other one and ends, with exit status 1 if
the process failed and 0 if it exited with 0. Launch 3.x cannot pass on the
process's own status: ``LaunchService.run()`` returns 0 or 1; the log names
the process and its status.
"""

from __future__ import annotations

from typing import Any

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.conditions import IfCondition
from launch.events.process import ProcessExited
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare
import yaml

PACKAGE = 'vyra_base_ipc'
DEMO_EXECUTABLE = 'demo_module_node'
MODULE_NAME = LaunchConfiguration('module_name')
NAMESPACE = LaunchConfiguration('namespace')
IPC_SERVER_CONFIG = PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'ipc_server.yaml'])


def generate_launch_description() -> LaunchDescription:
    """The launch arguments, and the module's processes made from them."""
    return LaunchDescription([
        DeclareLaunchArgument(
            'module_name',
            description='Name of the VYRA module (^[a-z][a-z0-9_]*$); names its IPC socket.'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='ROS namespace of the nodes, e.g. /robot1.'),
        DeclareLaunchArgument(
            'module_package', default_value=PACKAGE,
            description="Package of the module's own node."),
        DeclareLaunchArgument(
            'module_executable', default_value=DEMO_EXECUTABLE,
            description="Executable of the module's own node."),
        DeclareLaunchArgument(
            'host_ipc', default_value='false', choices=['true', 'false'],
            description="true: the module's node hosts the IPC server itself "
                        '(vyra_base_ipc.node.host_ipc_server) and gets the IPC server '
                        'parameters; no ipc_server is started.'),
        DeclareLaunchArgument(
            'servicers', default_value='',
            description="Extra servicers of the IPC server, a YAML list of "
                        "'package.module:ClassName', e.g. \"['my_arm.arm_service:ArmService']\" "
                        '(the servicers parameter; empty: none besides ModuleService).'),
        OpaqueFunction(function=_module_processes),
    ])


def _module_processes(context: LaunchContext) -> list[Node]:
    """The module's node and, unless it hosts the IPC server, ``ipc_server``.

    :raises ValueError: ``servicers`` is not a list of strings, or
        ``host_ipc:=true`` names the demo node, which does not host.
    """
    host_ipc = IfCondition(LaunchConfiguration('host_ipc')).evaluate(context)
    servicers = _servicers(context.perform_substitution(LaunchConfiguration('servicers')))
    module_package = context.perform_substitution(LaunchConfiguration('module_package'))
    module_executable = context.perform_substitution(LaunchConfiguration('module_executable'))
    if host_ipc and (module_package, module_executable) == (PACKAGE, DEMO_EXECUTABLE):
        raise ValueError(
            f'host_ipc:=true starts no ipc_server, but {DEMO_EXECUTABLE} does not host the IPC '
            'server: name a node that calls vyra_base_ipc.node.host_ipc_server with '
            'module_package:=<package> module_executable:=<executable>')
    # An empty list is left out: rcl reads `servicers: []` as a parameter without
    # a value, and launch_ros refuses empty lists anyway.
    servicer_parameters = [{'servicers': servicers}] if servicers else []
    ipc_parameters: list[Any] = [IPC_SERVER_CONFIG, {'module_name': MODULE_NAME}, *servicer_parameters]
    module_node = Node(
        package=module_package,
        executable=module_executable,
        namespace=NAMESPACE,
        parameters=ipc_parameters if host_ipc else [{'module_name': MODULE_NAME}],
        on_exit=_stop_the_module,
        output='screen',
    )
    if host_ipc:
        return [module_node]
    ipc_server = Node(
        package=PACKAGE,
        executable='ipc_server',
        namespace=NAMESPACE,
        parameters=ipc_parameters,
        on_exit=_stop_the_module,
        output='screen',
    )
    return [module_node, ipc_server]


def _servicers(text: str) -> list[str]:
    """The ``servicers`` launch argument as a list: a YAML list of
    ``'package.module:ClassName'``, or one such string; empty or ``[]``: none.

    :raises ValueError: anything else, with an example of the right form.
    """
    value: Any
    try:
        value = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError(f"launch argument servicers:={text!r} is not a list of 'package.module:ClassName'; "
                     'write it as servicers:="[\'my_arm.arm_service:ArmService\']"')


def _stop_the_module(event: ProcessExited, context: LaunchContext) -> list[Shutdown] | None:
    """``on_exit`` of every process of the module: the module does not run
    without any of them, so the launch ends when one exits."""
    if context.is_shutdown:
        return None  # the launch is stopping it (Ctrl-C, another process's exit)
    if event.returncode != 0:
        # An exception from an event handler is the one way a launch ends with a
        # non-zero status: LaunchService.run() then shuts down (stopping the other
        # processes) and returns 1. A Shutdown action would end it with 0.
        raise RuntimeError(f'{event.process_name} exited with status {event.returncode}; '
                           'the module cannot run without it: stopping the launch')
    return [Shutdown(reason=f'{event.process_name} exited')]
