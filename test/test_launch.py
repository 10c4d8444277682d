"""Launch files: consistency checks that always run (the files are read with
``ast`` by launch_reading.py, never imported: launch/launch_ros are not
installable here), and, where launch_ros exists, a launch_testing run of
module_ipc.launch.py in both of its modes and a launch whose IPC server fails
at start.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
import re
import subprocess
import sys
from typing import Any
import uuid
from xml.etree import ElementTree

import pytest
import yaml

from launch_reading import (
    IPC_SERVER_CONFIG,
    PACKAGE,
    Argument,
    Computed,
    LaunchFile,
    config_problems,
    console_scripts,
    declared_parameters,
    executable_problems,
    is_installed,
    parameter_problems,
    required_problems,
)
from ros_env import REPO

LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))
CONFIG_FILES = sorted((REPO / 'config').glob('*.yaml'))
LAUNCH_TEST = Path(__file__).resolve().parent / 'launch_tests' / 'module_ipc_launch.py'


def test_package_has_launch_and_config_files() -> None:
    assert LAUNCH_FILES, 'no launch/*.launch.py'
    assert CONFIG_FILES, 'no config/*.yaml'


@pytest.fixture(params=LAUNCH_FILES, ids=[path.name for path in LAUNCH_FILES])
def launch_file(request: pytest.FixtureRequest) -> LaunchFile:
    return LaunchFile(request.param)


def test_launch_file_is_installed(launch_file: LaunchFile) -> None:
    assert is_installed(f'launch/{launch_file.path.name}')


def test_every_executable_is_a_console_script_of_this_package(launch_file: LaunchFile) -> None:
    assert executable_problems(launch_file) == []


def test_every_config_file_exists_and_is_installed(launch_file: LaunchFile) -> None:
    assert config_problems(launch_file) == []


def test_every_parameter_is_declared_by_its_node(launch_file: LaunchFile) -> None:
    assert parameter_problems(launch_file) == []


def test_module_name_argument_goes_to_every_node(launch_file: LaunchFile) -> None:
    assert 'module_name' in launch_file.arguments
    for node in launch_file.nodes:
        for parameters in node.parameter_lists():
            given = [item.get('module_name') for item in parameters if isinstance(item, dict)]
            assert Argument('module_name') in given, f'{launch_file.path.name}:{node.line}'


def test_every_process_is_required(launch_file: LaunchFile) -> None:
    assert required_problems(launch_file) == []


# -- module_ipc.launch.py: hosting, servicers, its own argument parsing -------------------


@pytest.fixture
def module_ipc() -> LaunchFile:
    return LaunchFile(REPO / 'launch' / 'module_ipc.launch.py')


def test_module_ipc_arguments_and_defaults(module_ipc: LaunchFile) -> None:
    assert module_ipc.arguments == {
        'module_name': None, 'namespace': '', 'module_package': PACKAGE,
        'module_executable': 'demo_module_node', 'host_ipc': 'false', 'servicers': '', 'use_sim_time': '',
        'params_file': ''}


def test_the_ipc_server_config_goes_to_ipc_server_or_to_the_hosting_module_node(
        module_ipc: LaunchFile) -> None:
    by_executable = {module_ipc.resolve(node.executable): node for node in module_ipc.nodes}
    assert set(by_executable) == {'demo_module_node', 'ipc_server'}
    ipc_server = by_executable['ipc_server'].parameter_lists()
    assert ipc_server and all(IPC_SERVER_CONFIG in parameters for parameters in ipc_server)
    module_node = by_executable['demo_module_node'].parameter_lists()
    user_file = Computed('_params_file')
    # Separate server: module_name only; hosting (with or without servicers): the server's parameters.
    # With a params_file: the same, the user's file after the package's config and before module_name.
    assert [{'module_name': Argument('module_name')}] in module_node
    assert [user_file, {'module_name': Argument('module_name')}] in module_node
    # (hosting: with or without a params_file, servicers and use_sim_time)
    assert sum(IPC_SERVER_CONFIG in parameters for parameters in module_node) == 8
    for parameters in ipc_server + module_node:
        if user_file in parameters:
            assert parameters.index(user_file) == parameters.index({'module_name': Argument('module_name')}) - 1
            assert IPC_SERVER_CONFIG not in parameters or parameters.index(IPC_SERVER_CONFIG) == 0
    assert sum(user_file in parameters for parameters in ipc_server) == 4
    # servicers is given only when the argument names some (an empty list has no value in ROS).
    for parameters in ipc_server + module_node:
        for item in parameters:
            if isinstance(item, dict) and 'servicers' in item:
                assert item == {'servicers': Computed('_servicers')}


def test_use_sim_time_goes_to_every_node_only_when_given_and_after_the_files(module_ipc: LaunchFile) -> None:
    """use_sim_time:=true reaches both nodes; left empty, nothing overrides
    what a params_file says (a default of false would)."""
    sim_time = {'use_sim_time': Computed('_use_sim_time')}
    for node in module_ipc.nodes:
        lists = node.parameter_lists()
        assert any(sim_time in parameters for parameters in lists), node.executable
        assert any(sim_time not in parameters for parameters in lists), node.executable
        for parameters in lists:
            if sim_time in parameters:
                assert parameters[-1] == sim_time  # after every file: it wins
    parse = module_ipc.pure_function('_use_sim_time', {})
    assert parse('true') is True and parse('false') is False and parse('') is None
    assert module_ipc.choices['use_sim_time'] == ['', 'true', 'false']


def test_module_ipc_names_the_ipc_server_node_after_the_module(module_ipc: LaunchFile) -> None:
    # Modules launched side by side in one namespace: no two nodes called /ipc_server.
    by_executable = {module_ipc.resolve(node.executable): node for node in module_ipc.nodes}
    assert by_executable['ipc_server'].name == [Argument('module_name'), '_ipc_server']
    assert by_executable['demo_module_node'].name is None  # the module's node keeps its own name


def test_module_name_argument_is_checked_before_anything_starts(module_ipc: LaunchFile) -> None:
    from vyra_base_ipc.address import validate_module_name

    check = module_ipc.pure_function('_module_name', {'validate_module_name': validate_module_name})
    assert check('arm_2') == 'arm_2'
    for wrong in ('a-b', 'Not_Valid', '', '2arm'):
        with pytest.raises(ValueError, match=re.escape(f'launch argument module_name:={wrong!r}: invalid module name')):
            check(wrong)


def test_servicers_argument_parsing(module_ipc: LaunchFile) -> None:
    parse = module_ipc.pure_function('_servicers', {'yaml': yaml, 'Any': Any})
    assert parse('') == [] and parse('  ') == [] and parse('[]') == []
    assert parse("['my_arm.arm_service:ArmService']") == ['my_arm.arm_service:ArmService']
    assert parse('[a.b:C, d.e:F]') == ['a.b:C', 'd.e:F']
    assert parse('my_arm.arm_service:ArmService') == ['my_arm.arm_service:ArmService']
    for wrong in ('{a: b}', '[1, 2]', '[a, [b]]', '~', '[unclosed'):
        with pytest.raises(ValueError, match=r'is not a list of .*servicers:="\[\'my_arm'):
            parse(wrong)


def test_params_file_argument_parsing(module_ipc: LaunchFile, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    parse = module_ipc.pure_function('_params_file', {'Path': Path, 'yaml': yaml, 'Any': Any})
    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n    grace_period: 2.5\n'
                      'robot1:\n  ipc_server:\n    ros__parameters:\n      servicers: [a.b:C]\n')
    assert parse('', []) is None and parse('  ', ['a.b:C']) is None
    assert parse(str(params), []) == params
    monkeypatch.chdir(tmp_path)
    assert parse('params.yaml', []) == params  # absolute: the nodes may run elsewhere
    monkeypatch.setenv('HOME', str(tmp_path))
    assert parse('~/params.yaml', []) == params
    with pytest.raises(ValueError, match=r'params\.yaml sets servicers, and so does the launch argument'):
        parse('params.yaml', ['x.y:Z'])
    assert parse('params.yaml', [], True) == params  # it sets no use_sim_time
    params.write_text('/**:\n  ros__parameters:\n    use_sim_time: true\n')
    assert parse('params.yaml', [], False) == params
    with pytest.raises(ValueError, match=r'params\.yaml sets use_sim_time, and so does the launch argument '
                                         r'use_sim_time: give it in one place'):
        parse('params.yaml', [], True)
    with pytest.raises(ValueError, match=rf"params_file:='nope.yaml': {tmp_path}/nope.yaml does not exist"):
        parse('nope.yaml', [])
    with pytest.raises(ValueError, match=rf'params_file:=.*: {tmp_path} is not a file'):
        parse(str(tmp_path), [])
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match='is not a file'):  # and does not wait for a writer
        parse(str(fifo), [])
    wrong = tmp_path / 'wrong.yaml'
    for content, message in [
            ('/**:\n  ros__parameters:\n    module_name: x\n', 'sets module_name: give it only as the launch'),
            ('a:\n  b:\n    ros__parameters:\n      module_name: x\n', 'sets module_name'),
            ('/**: [1\n', 'is not YAML'), ('', 'is not a ROS 2 parameter file'),
            ('- 1\n', 'is not a ROS 2 parameter file'), ('ipc_server: 3\n', 'is not a ROS 2 parameter file')]:
        wrong.write_text(content)
        with pytest.raises(ValueError, match=message):
            parse(str(wrong), [])
    if os.geteuid() != 0:  # root reads any file
        params.chmod(0)
        with pytest.raises(ValueError, match='cannot read .*: Permission denied'):
            parse(str(params), [])


def test_checks_accept_only_the_launch_files_own_user_parameter_file(tmp_path: Path) -> None:
    path = tmp_path / 'user.launch.py'
    path.write_text("""
from launch_ros.actions import Node


def generate_launch_description():
    return [Node(package='vyra_base_ipc', executable='ipc_server', on_exit=_stop,
                 parameters=[_params_file(), _other_file(), {'module_name': 'x'}])]


def _params_file():
    return None


def _other_file():
    return None


def _stop(event, context):
    return None
""")
    assert parameter_problems(LaunchFile(path)) == [
        "user.launch.py:6 (ipc_server): cannot check parameters item Computed(function='_other_file')"]


BROKEN_LAUNCH = """
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    config = PathJoinSubstitution([FindPackageShare('vyra_base_ipc'), 'config', 'missing.yaml'])
    return LaunchDescription([
        DeclareLaunchArgument('module_executable', default_value='no_such_script'),
        Node(package='vyra_base_ipc', executable=LaunchConfiguration('module_executable')),
        Node(package='vyra_base_ipc', executable='ipc_server',
             parameters=[{'module_name': 'x', 'socket_pth': '/tmp/typo.sock'}]),
        Node(package='other_package', executable='ipc_server', parameters=[config]),
    ])
"""


def test_checks_catch_a_broken_launch_file(tmp_path: Path) -> None:
    path = tmp_path / 'broken.launch.py'
    path.write_text(BROKEN_LAUNCH)
    broken = LaunchFile(path)
    assert executable_problems(broken) == [
        "broken.launch.py:13: 'no_such_script' is not a console script of vyra_base_ipc",
        "broken.launch.py:16: package 'other_package' (by default) is not vyra_base_ipc"]
    assert config_problems(broken) == ['config/missing.yaml does not exist']
    assert parameter_problems(broken) == [
        "broken.launch.py:14 (ipc_server): ['socket_pth'] not declared by the node"]
    assert required_problems(broken) == [
        f'broken.launch.py:{line}: no on_exit function of this file' for line in (13, 14, 16)]


BROKEN_HOSTING_LAUNCH = """
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

CONFIG = PathJoinSubstitution([FindPackageShare('vyra_base_ipc'), 'config', 'ipc_server.yaml'])
NAME = LaunchConfiguration('module_name')


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('module_name'),
        DeclareLaunchArgument('module_executable', default_value='demo_module_node'),
        OpaqueFunction(function=_processes),
    ])


def _processes(context):
    host = _flag(context)
    extra = [{'servicer': _flag(context)}] if host else []
    hosted = [CONFIG, {'module_name': NAME}, *extra]
    return [
        Node(package='vyra_base_ipc',
             executable=context.perform_substitution(LaunchConfiguration('module_executable')),
             parameters=hosted if host else [{'module_name': NAME, 'socket_path': ''}],
             on_exit=_stop),
        Node(package='vyra_base_ipc', executable='ipc_server', parameters=[CONFIG, {'grace': 1.0}]),
    ]


def _flag(context):
    return True


def _stop(event, context):
    return None
"""


def test_checks_catch_a_broken_launch_file_with_choices(tmp_path: Path) -> None:
    path = tmp_path / 'hosting.launch.py'
    path.write_text(BROKEN_HOSTING_LAUNCH)
    broken = LaunchFile(path)
    assert executable_problems(broken) == []
    # Every branch is checked: the hosting one with its optional servicer
    # (misspelt), the other one (a parameter only the hosting helper declares).
    assert parameter_problems(broken) == [
        "hosting.launch.py:25 (demo_module_node): ['servicer'] not declared by the node",
        "hosting.launch.py:25 (demo_module_node): ['socket_path'] not declared by the node",
        "hosting.launch.py:29 (ipc_server): ['grace'] not declared by the node"]
    assert required_problems(broken) == ['hosting.launch.py:29: no on_exit function of this file']


@pytest.mark.parametrize('parameters', [
    '[{**OTHER}]', '[CONFIG + OTHER]', '[{"x": 1} | OTHER]', '[TWICE]', '[undefined]',
    '[{"module_name": lambda: 1}]', '[CONFIG, os.environ["X"]]'])
def test_the_reading_refuses_what_it_cannot_evaluate(tmp_path: Path, parameters: str) -> None:
    path = tmp_path / 'opaque.launch.py'
    path.write_text(f"""
import os
from launch_ros.actions import Node
CONFIG = 'c.yaml'
OTHER = {{}}
TWICE = 1
TWICE = 2


def generate_launch_description():
    return [Node(package='vyra_base_ipc', executable='ipc_server', parameters={parameters})]
""")
    with pytest.raises(AssertionError, match='cannot check'):
        LaunchFile(path)


@pytest.mark.parametrize('config', CONFIG_FILES, ids=[path.name for path in CONFIG_FILES])
def test_config_matches_any_node_name_and_namespace(config: Path) -> None:
    content = yaml.safe_load(config.read_text())
    assert list(content) == ['/**'], f'{config.name}: use the /** key so namespaced nodes match'
    assert isinstance(content['/**']['ros__parameters'], dict)


def test_the_ipc_server_script_runs_the_node_module() -> None:
    assert console_scripts()['ipc_server'] == 'vyra_base_ipc_server:main'


# -- the README's XML and YAML launch files ------------------------------------------

#: How a frontend names an installed file: $(find-pkg-share <package>)/<path>.
_SHARE_FILE = re.compile(r'\$\(find-pkg-share ([\w-]+)\)/(.+)')


def _readme_frontend_files() -> dict[str, str]:
    """The README's XML and YAML launch files (the code blocks that include module_ipc.launch.py)."""
    blocks = re.findall(r'```(xml|yaml)\n(.*?)```', (REPO / 'README.md').read_text(), re.S)
    return {language: text for language, text in blocks if 'module_ipc.launch.py' in text}


def _frontend_actions(language: str, text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The includes (``file``, ``arg``: {name: value}) and nodes (``pkg``,
    ``exec``, ``param``: [{name or from}]) of an XML or YAML launch file, in
    one shape: the tags and attributes launch_xml and launch_yaml read."""
    includes: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    if language == 'xml':
        root = ElementTree.fromstring(text)
        assert root.tag == 'launch'
        for element in root:
            children = [dict(child.attrib, tag=child.tag) for child in element]
            if element.tag == 'include':
                includes.append({'file': element.get('file'),
                                 'arg': {child['name']: child.get('value') for child in children}})
            elif element.tag == 'node':
                nodes.append(dict(element.attrib, param=[c for c in children if c['tag'] == 'param']))
    else:
        for entry in yaml.safe_load(text)['launch']:
            if 'include' in entry:
                include = entry['include']
                includes.append({'file': include['file'],
                                 'arg': {arg['name']: arg.get('value') for arg in include.get('arg', [])}})
            elif 'node' in entry:
                nodes.append(dict(entry['node'], param=entry['node'].get('param', [])))
    return includes, nodes


def _share_file_problems(where: str, path: str | None) -> list[str]:
    match = _SHARE_FILE.fullmatch(path or '')
    if match is None:
        return [f'{where}: {path!r} is not $(find-pkg-share {PACKAGE})/<file>']
    package, relative = match.groups()
    if package != PACKAGE or not (REPO / relative).is_file() or not is_installed(relative):
        return [f'{where}: {path} is not a file {PACKAGE} installs']
    return []


def frontend_problems(language: str, text: str, module_ipc: LaunchFile) -> list[str]:
    """What in an XML or YAML launch file names something this package does
    not have: an included file, a launch argument of module_ipc.launch.py (and
    its required ones), an executable, a parameter of that executable, a
    parameter file."""
    includes, nodes = _frontend_actions(language, text)
    problems = [] if includes and nodes else [f'{language}: expected an include and a node']
    for include in includes:
        problems += _share_file_problems(f'{language} include', include['file'])
        if not str(include['file']).endswith('/launch/module_ipc.launch.py'):
            continue
        for name in include['arg']:
            if name not in module_ipc.arguments:
                problems.append(f'{language} include: module_ipc.launch.py has no argument {name!r}')
        for name, default in module_ipc.arguments.items():
            if default is None and name not in include['arg']:
                problems.append(f'{language} include: the required argument {name!r} is missing')
    for node in nodes:
        executable = node.get('exec')
        if node.get('pkg') != PACKAGE or executable not in console_scripts():
            problems.append(f'{language} node: {node.get("pkg")}/{executable} is not an executable of {PACKAGE}')
            continue
        declared = declared_parameters(executable)
        for param in node['param']:
            if 'from' in param:
                problems += _share_file_problems(f'{language} node param', param['from'])
            elif param.get('name') not in declared:
                problems.append(f'{language} node: {executable} declares no parameter {param.get("name")!r}')
    return problems


def test_readme_xml_and_yaml_launch_files_name_what_exists(module_ipc: LaunchFile) -> None:
    files = _readme_frontend_files()
    assert sorted(files) == ['xml', 'yaml']
    for language, text in files.items():
        assert frontend_problems(language, text, module_ipc) == []


def test_frontend_checks_catch_what_does_not_exist(module_ipc: LaunchFile) -> None:
    text = _readme_frontend_files()['xml']
    for wrong, expected in [
            ('name="module_name" value="arm"', "the required argument 'module_name' is missing"),
            ('name="namespace"', "module_ipc.launch.py has no argument 'name_space'"),
            ('name="grace_period"', "ipc_server declares no parameter 'grace_periods'"),
            ('exec="ipc_server"', 'vyra_base_ipc/ipc_srv is not an executable'),
            ('config/ipc_server.yaml', 'config/ipc.yaml is not a file vyra_base_ipc installs')]:
        assert wrong in text
        broken = text.replace(wrong, {
            'name="module_name" value="arm"': 'name="module" value="arm"',
            'name="namespace"': 'name="name_space"',
            'name="grace_period"': 'name="grace_periods"',
            'exec="ipc_server"': 'exec="ipc_srv"',
            'config/ipc_server.yaml': 'config/ipc.yaml'}[wrong])
        assert any(expected in problem for problem in frontend_problems('xml', broken, module_ipc)), expected


# -- launch_testing, where launch_ros exists ----------------------------------------


def _launch_testing_missing() -> str | None:
    for module in ('launch_ros', 'launch_testing'):
        if importlib.util.find_spec(module) is None:
            return (f'{module} is not installed (launch/launch_ros/launch_testing are not '
                    'available from the package index; on a ROS 2 installation they are)')
    try:
        from ament_index_python.packages import get_package_share_directory
        get_package_share_directory(PACKAGE)
    except (ImportError, LookupError, OSError):
        return (f'{PACKAGE} is not installed in an ament prefix (FindPackageShare needs it): '
                'colcon build first')
    return None


def _installed_launch_file(name: str) -> Path:
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / 'launch' / name


def _has_package(package: str) -> bool:
    try:
        from ament_index_python.packages import get_package_prefix
        get_package_prefix(package)
    except (ImportError, LookupError, OSError):
        return False
    return True


#: module_ipc.launch.py's two ways to run, with launch arguments.
MODULE_IPC_RUNS = {
    'ipc_server_with_servicers': {
        'servicers': "['vyra_base_ipc.demo.backend_service:BackendService']"},
    'hosted_by_my_arm': {'module_package': 'my_arm', 'module_executable': 'arm_node', 'host_ipc': 'true'},
    # The file (written by the test) moves the socket: the launch test checks the sockets there.
    'ipc_server_with_params_file': {'params_file': 'PARAMS_FILE'},
}

#: What `ros2 launch FILE ARGS` does (ros2launch.api.launch_a_launch_file),
#: without ros2cli: its exit status is LaunchService.run()'s.
ROS2_LAUNCH = """
import sys
from launch import LaunchDescription, LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import AnyLaunchDescriptionSource
arguments = sys.argv[2:]
service = LaunchService(argv=arguments, noninteractive=True)
service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
    AnyLaunchDescriptionSource(sys.argv[1]),
    launch_arguments=[tuple(argument.split(':=', 1)) for argument in arguments])]))
sys.exit(service.run())
"""


@pytest.mark.ros
@pytest.mark.skipif(_launch_testing_missing() is not None, reason=str(_launch_testing_missing()))
@pytest.mark.parametrize('run', list(MODULE_IPC_RUNS))
def test_module_ipc_runs_under_launch_testing(run: str, ros_environ: dict[str, str],
                                              tmp_path: Path) -> None:
    arguments = MODULE_IPC_RUNS[run]
    if 'module_package' in arguments and not _has_package(arguments['module_package']):
        pytest.skip(f"{arguments['module_package']} is not built in this workspace")
    module = f'launch{uuid.uuid4().hex[:10]}'
    socket = Path(f'/tmp/{module}_ipc.sock')
    if arguments.get('params_file') == 'PARAMS_FILE':
        socket = Path(f'/tmp/{module}_from_params_file.sock')
        params_file = tmp_path / 'params.yaml'
        params_file.write_text(f'/**:\n  ros__parameters:\n    socket_path: {socket}\n')
        arguments = dict(arguments, params_file=str(params_file))
    env = dict(ros_environ, VYRA_LAUNCH_FILE=str(_installed_launch_file('module_ipc.launch.py')),
               VYRA_LAUNCH_MODULE=module, VYRA_LAUNCH_ARGUMENTS=json.dumps(arguments),
               VYRA_LAUNCH_SOCKET=str(socket))
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; from launch_testing.launch_test import main; sys.exit(main())',
         str(LAUNCH_TEST), '--junit-xml', str(tmp_path / 'launch_test.xml')],
        env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not socket.exists()
    assert not socket.with_suffix('.ttrpc.sock').exists()


@pytest.mark.ros
@pytest.mark.skipif(_launch_testing_missing() is not None, reason=str(_launch_testing_missing()))
def test_module_ipc_ends_with_1_when_ipc_server_fails_at_start(ros_environ: dict[str, str]) -> None:
    # A servicer that does not import: ipc_server exits 2 at start, the demo node would run on.
    result = subprocess.run(
        [sys.executable, '-c', ROS2_LAUNCH, str(_installed_launch_file('module_ipc.launch.py')),
         f'module_name:=launch{uuid.uuid4().hex[:10]}', "servicers:=['no_such_package.module:Servicer']"],
        env=ros_environ, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert re.search(r'ipc_server-\d+ exited with status 2; the module cannot run without it', output), output
    assert "sending signal 'SIGINT' to process[demo_module_node" in output, output
    for pid in re.findall(r'process started with pid \[(\d+)\]', output):
        assert not Path(f'/proc/{pid}').exists() or 'Z' in Path(f'/proc/{pid}/stat').read_text().split()[2], \
            f'process {pid} still runs:\n{output}'
