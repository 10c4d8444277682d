"""Start a VYRA module's ROS 2 node and its IPC server.

    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=arm namespace:=/robot1 \
        module_package:=my_arm module_executable:=arm_node

Both nodes get the ``module_name`` launch argument as a parameter. The IPC
server (``ipc_server``) also gets ``config/ipc_server.yaml`` of this package,
whose ``/**`` key matches it under any name and namespace; its socket path
comes from those parameters (empty ``socket_path``: ``/tmp/<module_name>_ipc.sock``).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    """The module's node and its ``ipc_server``, as the module docstring says."""
    module_name = LaunchConfiguration('module_name')
    namespace = LaunchConfiguration('namespace')
    ipc_server_config = PathJoinSubstitution(
        [FindPackageShare('vyra_base_ipc'), 'config', 'ipc_server.yaml'])
    return LaunchDescription([
        DeclareLaunchArgument(
            'module_name',
            description='Name of the VYRA module (^[a-z][a-z0-9_]*$); names its IPC socket.'),
        DeclareLaunchArgument(
            'namespace', default_value='',
            description='ROS namespace of both nodes, e.g. /robot1.'),
        DeclareLaunchArgument(
            'module_package', default_value='vyra_base_ipc',
            description="Package of the module's own node."),
        DeclareLaunchArgument(
            'module_executable', default_value='demo_module_node',
            description="Executable of the module's own node."),
        Node(
            package=LaunchConfiguration('module_package'),
            executable=LaunchConfiguration('module_executable'),
            namespace=namespace,
            parameters=[{'module_name': module_name}],
            output='screen',
        ),
        Node(
            package='vyra_base_ipc',
            executable='ipc_server',
            namespace=namespace,
            parameters=[ipc_server_config, {'module_name': module_name}],
            output='screen',
        ),
    ])
