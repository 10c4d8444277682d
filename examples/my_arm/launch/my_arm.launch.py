"""Start my_arm: its node, which hosts the module's IPC server.

Usage::

    ros2 launch my_arm my_arm.launch.py
    ros2 launch my_arm my_arm.launch.py module_name:=arm2 namespace:=/robot1
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description() -> LaunchDescription:
    """The arm node with vyra_base_ipc's IPC server parameters and the module name."""
    ipc_config = PathJoinSubstitution([FindPackageShare('vyra_base_ipc'), 'config', 'ipc_server.yaml'])
    return LaunchDescription([
        DeclareLaunchArgument('module_name', default_value='my_arm',
                              description='Name of the module; names its IPC socket.'),
        DeclareLaunchArgument('namespace', default_value='', description='ROS namespace of the node.'),
        Node(
            package='my_arm',
            executable='arm_node',
            namespace=LaunchConfiguration('namespace'),
            parameters=[ipc_config, {'module_name': LaunchConfiguration('module_name')}],
            output='screen',
        ),
    ])
