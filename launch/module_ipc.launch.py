"""Start a VYRA module: its ROS 2 node and its IPC server.

    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=arm namespace:=/robot1 \
        module_package:=my_arm module_executable:=arm_node host_ipc:=true
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=arm \
        servicers:="['my_arm.arm_service:ArmService']"
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo params_file:=/etc/demo/params.yaml
    ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo use_sim_time:=true

The IPC server runs as a node of its own, the executable ``ipc_server`` as
node ``<module_name>_ipc_server`` (default; named after the module so that
modules launched side by side in one namespace do not share a node name, nor
their status name on /diagnostics), or inside the module's node
(``host_ipc:=true``, for a node that calls ``vyra_base_ipc.node.host_ipc_server``;
then no ``ipc_server`` is started).
The node that serves IPC gets this package's ``config/ipc_server.yaml``
(key ``/**``: any node name and namespace), ``module_name`` and, if given,
``servicers``; its socket comes from those parameters (by default
``/tmp/<module_name>_ipc.sock``). The module's node always gets ``module_name``.
``use_sim_time:=true`` or ``false`` sets that parameter on every node (empty,
the default: as the parameter files say; ROS's default is false).
A ``params_file`` goes to every node, after ``config/ipc_server.yaml`` (its
values win over that file's); it must not set ``module_name``, nor
``servicers`` or ``use_sim_time`` when the launch argument gives them.

Every process is required: when one exits while the launch runs (e.g.
``ipc_server`` with status 2 on an unusable parameter, or the module's node
crashing), the launch stops the other one and ends, with exit status 1 if
the process failed and 0 if it exited with 0. Launch 3.x cannot pass on the
process's own status: ``LaunchService.run()`` returns 0 or 1; the log names
the process and its status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.conditions import IfCondition
from launch.events.process import ProcessExited
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare
import yaml

from vyra_base_ipc.address import validate_module_name

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
        DeclareLaunchArgument(
            'use_sim_time', default_value='', choices=['', 'true', 'false'],
            description='true: every node of the module takes its time from /clock (the '
                        'use_sim_time parameter); false: from the system clock; empty: as the '
                        'parameter files say (else false).'),
        DeclareLaunchArgument(
            'params_file', default_value='',
            description='A ROS 2 parameter file (YAML) for every node of the module, e.g. '
                        'grace_period or socket_path of the IPC server; applied after the '
                        "package's config/ipc_server.yaml, keyed by node name "
                        '(<module_name>_ipc_server, /robot1/<module_name>_ipc_server) or /**. It may '
                        'set servicers and use_sim_time (if the launch arguments do not), not '
                        'module_name. Empty: none.'),
        OpaqueFunction(function=_module_processes),
    ])


def _module_processes(context: LaunchContext) -> list[Node]:
    """The module's node and, unless it hosts the IPC server, ``ipc_server``.

    :raises ValueError: ``module_name`` is not a module name, ``servicers``
        is not a list of strings, ``params_file`` is not a usable parameter
        file, or ``host_ipc:=true`` names the demo node, which does not host.
    """
    # Checked before anything starts: it names the ipc_server node, and a name
    # ROS refuses (a-b) would fail there with launch's "Invalid node name".
    _module_name(context.perform_substitution(MODULE_NAME))
    host_ipc = IfCondition(LaunchConfiguration('host_ipc')).evaluate(context)
    servicers = _servicers(context.perform_substitution(LaunchConfiguration('servicers')))
    module_package = context.perform_substitution(LaunchConfiguration('module_package'))
    module_executable = context.perform_substitution(LaunchConfiguration('module_executable'))
    sim_time = _use_sim_time(context.perform_substitution(LaunchConfiguration('use_sim_time')))
    params_file = _params_file(context.perform_substitution(LaunchConfiguration('params_file')), servicers,
                               sim_time is not None)
    user_files = [params_file] if params_file is not None else []
    if host_ipc and (module_package, module_executable) == (PACKAGE, DEMO_EXECUTABLE):
        raise ValueError(
            f'host_ipc:=true starts no ipc_server, but {DEMO_EXECUTABLE} does not host the IPC '
            'server: name a node that calls vyra_base_ipc.node.host_ipc_server with '
            'module_package:=<package> module_executable:=<executable>')
    # An empty list is left out: rcl reads `servicers: []` as a parameter without
    # a value, and launch_ros refuses empty lists anyway.
    servicer_parameters = [{'servicers': servicers}] if servicers else []
    # Only when given: as a default of false it would override a params_file's.
    sim_time_parameters = [{'use_sim_time': sim_time}] if sim_time is not None else []
    ipc_parameters: list[Any] = [IPC_SERVER_CONFIG, *user_files, {'module_name': MODULE_NAME},
                                 *servicer_parameters, *sim_time_parameters]
    module_node = Node(
        package=module_package,
        executable=module_executable,
        namespace=NAMESPACE,
        parameters=(ipc_parameters if host_ipc
                    else [*user_files, {'module_name': MODULE_NAME}, *sim_time_parameters]),
        on_exit=_stop_the_module,
        output='screen',
    )
    if host_ipc:
        return [module_node]
    ipc_server = Node(
        package=PACKAGE,
        executable='ipc_server',
        name=[MODULE_NAME, '_ipc_server'],
        namespace=NAMESPACE,
        parameters=ipc_parameters,
        on_exit=_stop_the_module,
        output='screen',
    )
    return [module_node, ipc_server]


def _module_name(text: str) -> str:
    """The ``module_name`` launch argument, checked.

    :raises ValueError: it does not match ``^[a-z][a-z0-9_]*$``.
    """
    try:
        return validate_module_name(text)
    except ValueError as error:
        raise ValueError(f'launch argument module_name:={text!r}: {error}') from None


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


def _use_sim_time(text: str) -> bool | None:
    """The ``use_sim_time`` launch argument: ``True``, ``False``, or ``None``
    (empty: the node gets none from the launch file). ``choices`` has checked it."""
    return None if not text else text == 'true'


def _params_file(text: str, servicers: list[str], sim_time: bool = False) -> Path | None:
    """The ``params_file`` launch argument as an absolute path (``~`` expanded);
    ``None`` when empty.

    The file must not set ``module_name``, nor ``servicers`` or
    ``use_sim_time`` when a launch argument gives them (``servicers`` not
    empty, ``sim_time`` true): which value a node gets would depend on how the file
    names the node (ROS applies each key's values in the order the key first
    appears across the files: a node's own key in this file comes after the
    ``/**`` of config/ipc_server.yaml), so the launch argument could lose.

    :raises ValueError: it names no readable file, is not YAML of ROS 2
        parameters, or sets ``module_name``, or ``servicers`` or
        ``use_sim_time`` that a launch argument gives too. Checked
        here: each node would otherwise fail alone at start.
    """
    if not text.strip():
        return None
    path = Path(text.strip()).expanduser().absolute()
    where = f'launch argument params_file:={text!r}'
    # is_file() first: opening a FIFO would wait for a writer.
    if not path.is_file():
        reason = 'is not a file' if path.exists() else 'does not exist'
        raise ValueError(f'{where}: {path} {reason}')
    try:
        content = yaml.safe_load(path.read_bytes())
    except OSError as error:
        raise ValueError(f'{where}: cannot read {path}: {error.strerror or error}') from None
    except yaml.YAMLError as error:
        raise ValueError(f'{where}: {path} is not YAML: {error}') from None
    sections: list[Any] = []
    pending = [content]
    while pending:
        value = pending.pop()
        if not isinstance(value, dict):
            raise ValueError(f'{where}: {path} is not a ROS 2 parameter file '
                             '(<node name or /**>: {ros__parameters: {<name>: <value>}})')
        for key, inner in value.items():
            (sections if key == 'ros__parameters' else pending).append(inner)
    given = {name for section in sections if isinstance(section, dict) for name in section}
    if 'module_name' in given:
        raise ValueError(f'{where}: {path} sets module_name: give it only as the launch argument '
                         'module_name:=<name>')
    for name, too in (('servicers', bool(servicers)), ('use_sim_time', sim_time)):
        if name in given and too:
            raise ValueError(f'{where}: {path} sets {name}, and so does the launch argument '
                             f'{name}: give it in one place')
    return path


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
