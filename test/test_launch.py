"""Launch files: consistency checks that always run (the files are parsed
with ``ast``, never imported: launch/launch_ros are not installable here),
and, where launch_ros exists, a launch_testing run of every launch file and a
launch whose IPC server fails at start.

The ``ast`` reading evaluates the subset of launch-file syntax this package
uses and fails on anything else: literals, names bound once, lists (with
``*`` splices), dicts, ``a if c else b`` (every branch is checked),
``LaunchConfiguration``, ``FindPackageShare``, ``PathJoinSubstitution``,
``context.perform_substitution(...)`` (its argument), and calls of the launch
file's own functions (values computed at launch time: never package,
executable or parameter names). ``Node(...)`` calls are found anywhere in the
file, inside an ``OpaqueFunction``'s function too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fnmatch import fnmatch
import importlib
import importlib.util
import json
import os
from pathlib import Path
import re
import subprocess
import sys
from typing import Any
import uuid

import pytest
import yaml

from ros_env import REPO

PACKAGE = 'vyra_base_ipc'
LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))
CONFIG_FILES = sorted((REPO / 'config').glob('*.yaml'))
LAUNCH_TEST = Path(__file__).resolve().parent / 'launch_tests' / 'module_ipc_launch.py'


# -- what setup.py says -------------------------------------------------------------


def _setup_call() -> ast.Call:
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'setup':
            return node
    raise AssertionError('setup.py has no setup(...) call')


def _keyword(call: ast.Call, name: str) -> ast.expr:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    raise AssertionError(f'setup() has no {name}=')


def console_scripts() -> dict[str, str]:
    """``{name: 'module:function'}`` from setup.py's entry points."""
    entry_points = ast.literal_eval(_keyword(_setup_call(), 'entry_points'))
    scripts = {}
    for line in entry_points['console_scripts']:
        name, _, target = line.partition('=')
        scripts[name.strip()] = target.strip()
    return scripts


def _string(node: ast.expr) -> str | None:
    """A str literal, or an f-string over ``package_name``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif (isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name)
                  and value.value.id == 'package_name'):
                parts.append(PACKAGE)
            else:
                return None
        return ''.join(parts)
    return None


def installed_data_files() -> list[tuple[str, str]]:
    """``(destination directory, glob pattern)`` of setup.py's ``data_files``
    entries of the form ``(dest, glob(pattern))``."""
    entries = []
    for element in getattr(_keyword(_setup_call(), 'data_files'), 'elts', []):
        if not (isinstance(element, ast.Tuple) and len(element.elts) == 2):
            continue
        destination, files = element.elts
        if (isinstance(files, ast.Call) and getattr(files.func, 'id', None) == 'glob'
                and files.args and _string(destination) and _string(files.args[0])):
            entries.append((_string(destination), _string(files.args[0])))
    return entries


def is_installed(relative: str) -> bool:
    """Whether data_files installs the source file ``relative`` to the same
    relative place under ``share/<package>``."""
    directory = os.path.dirname(relative)
    return any(destination == f'share/{PACKAGE}/{directory}' and fnmatch(relative, pattern)
               for destination, pattern in installed_data_files())


def declared_parameters(executable: str) -> frozenset[str]:
    """The parameter table of the module behind a console script."""
    module_name = console_scripts()[executable].partition(':')[0]
    module = importlib.import_module(module_name)
    declared = getattr(module, 'DECLARED_PARAMETERS', None)
    assert declared is not None, f'{module_name} (executable {executable}) has no DECLARED_PARAMETERS'
    return declared


# -- what a launch file says --------------------------------------------------------


@dataclass(frozen=True)
class Argument:
    """A ``LaunchConfiguration('name')``."""
    name: str


@dataclass(frozen=True)
class ShareFile:
    """``PathJoinSubstitution([FindPackageShare(package), *parts])``."""
    package: str
    relative: str


@dataclass(frozen=True)
class Choice:
    """``a if condition else b``: either value, decided at launch time."""
    options: tuple[Any, ...]


@dataclass(frozen=True)
class Splice:
    """``*value`` inside a list: the items of ``value``."""
    value: Any


@dataclass(frozen=True)
class Computed:
    """The result of a call of one of the launch file's own functions."""
    function: str


@dataclass(frozen=True)
class Function:
    """A function defined at the launch file's top level, by name."""
    name: str


@dataclass
class LaunchNode:
    line: int
    package: Any = None
    executable: Any = None
    parameters: Any = field(default_factory=list)
    on_exit: Any = None

    def parameter_lists(self) -> list[list[Any]]:
        """Every list of parameter items this node may get (one per launch-time choice)."""
        return alternatives(self.parameters)


def alternatives(value: Any) -> list[Any]:
    """The concrete values ``value`` may take: choices expanded, splices spliced."""
    if isinstance(value, Choice):
        return [concrete for option in value.options for concrete in alternatives(option)]
    if isinstance(value, list):
        combinations: list[list[Any]] = [[]]
        for item in value:
            if isinstance(item, Splice):
                expansions = [list(spliced) for spliced in alternatives(item.value)]
            else:
                expansions = [[concrete] for concrete in alternatives(item)]
            combinations = [done + more for done in combinations for more in expansions]
        return combinations
    return [value]


class LaunchFile:
    """The launch arguments, nodes and files of one launch file, read with ``ast``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = tree = ast.parse(path.read_text(), str(path))
        self.functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        # Names assigned anywhere (module level or in a function); a name bound
        # more than once cannot be evaluated and fails when it is needed.
        self.variables: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name):
                self.variables.setdefault(node.targets[0].id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.value is not None:
                self.variables.setdefault(node.target.id, []).append(node.value)
        self.arguments: dict[str, str | None] = {}
        self.nodes: list[LaunchNode] = []
        self.share_files: list[ShareFile] = []
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name == 'DeclareLaunchArgument':
                default = next((k.value for k in node.keywords if k.arg == 'default_value'), None)
                self.arguments[self.value(node.args[0])] = (
                    None if default is None else self.value(default))
            elif name == 'Node':
                launch_node = LaunchNode(line=node.lineno)
                for keyword in node.keywords:
                    if keyword.arg in ('package', 'executable', 'parameters', 'on_exit'):
                        setattr(launch_node, keyword.arg, self.value(keyword.value))
                self.nodes.append(launch_node)
            elif name == 'PathJoinSubstitution':
                self.share_files.append(self.value(node))

    def where(self, node: ast.AST) -> str:
        return f'{self.path.name}:{getattr(node, "lineno", "?")}'

    def value(self, node: ast.expr) -> Any:
        """Evaluate the launch-file subset this package uses; fail on anything else."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.functions:
                return Function(node.id)
            bound = self.variables.get(node.id, [])
            if len(bound) == 1:
                return self.value(bound[0])
            raise AssertionError(f'{self.where(node)}: {node.id!r} is bound {len(bound)} times; '
                                 'cannot check it without running launch')
        if isinstance(node, ast.List):
            return [Splice(self.value(element.value)) if isinstance(element, ast.Starred)
                    else self.value(element) for element in node.elts]
        if isinstance(node, ast.Dict):
            if None in node.keys:
                raise AssertionError(f'{self.where(node)}: cannot check ** in {ast.unparse(node)!r}')
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.IfExp):
            return Choice((self.value(node.body), self.value(node.orelse)))
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name == 'LaunchConfiguration':
                return Argument(self.value(node.args[0]))
            if name == 'FindPackageShare':
                return ('share', self.value(node.args[0]))
            if name == 'PathJoinSubstitution':
                parts = self.value(node.args[0])
                assert isinstance(parts[0], tuple) and parts[0][0] == 'share', \
                    f'{self.where(node)}: paths must start at FindPackageShare(...)'
                assert all(isinstance(part, str) for part in parts[1:]), \
                    f'{self.where(node)}: path parts must be literals'
                return ShareFile(parts[0][1], '/'.join(parts[1:]))
            if name == 'perform_substitution' and isinstance(node.func, ast.Attribute) \
                    and len(node.args) == 1:
                return self.value(node.args[0])
            if isinstance(node.func, ast.Name) and node.func.id in self.functions:
                return Computed(node.func.id)
        raise AssertionError(f'{self.where(node)}: cannot check '
                             f'{ast.unparse(node)!r} without running launch')

    def resolve(self, value: Any) -> Any:
        """A launch argument's default, else the value itself."""
        if isinstance(value, Argument):
            assert value.name in self.arguments, f'{self.path.name}: undeclared argument {value.name}'
            return self.arguments[value.name]
        return value

    def pure_function(self, name: str, namespace: dict[str, Any]) -> Any:
        """The launch file's top-level function ``name``, compiled alone with
        ``namespace`` as its globals (for functions that need no launch)."""
        module = ast.Module(body=[self.functions[name]], type_ignores=[])
        code = compile(module, str(self.path), 'exec')
        scope = dict(namespace)
        exec(code, scope)  # the launch file's own code, nothing else
        return scope[name]


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def test_package_has_launch_and_config_files() -> None:
    assert LAUNCH_FILES, 'no launch/*.launch.py'
    assert CONFIG_FILES, 'no config/*.yaml'


def executable_problems(launch_file: LaunchFile) -> list[str]:
    scripts = console_scripts()
    problems = [] if launch_file.nodes else [f'{launch_file.path.name} starts no Node']
    for node in launch_file.nodes:
        package, executable = launch_file.resolve(node.package), launch_file.resolve(node.executable)
        where = f'{launch_file.path.name}:{node.line}'
        if package != PACKAGE:
            problems.append(f'{where}: package {package!r} (by default) is not {PACKAGE}')
        elif executable not in scripts:
            problems.append(f'{where}: {executable!r} is not a console script of {PACKAGE}')
    return problems


def config_problems(launch_file: LaunchFile, root: Path = REPO) -> list[str]:
    problems = [] if launch_file.share_files else [f'{launch_file.path.name} names no config file']
    for share_file in launch_file.share_files:
        if share_file.package != PACKAGE:
            problems.append(f'{share_file.relative} is looked up in {share_file.package}')
        elif not (root / share_file.relative).is_file():
            problems.append(f'{share_file.relative} does not exist')
        elif not is_installed(share_file.relative):
            problems.append(f'setup.py data_files do not install {share_file.relative}')
    return problems


#: The IPC server's parameter file: a node given it serves IPC.
IPC_SERVER_CONFIG = ShareFile(PACKAGE, 'config/ipc_server.yaml')


def hosting_parameters() -> frozenset[str]:
    """What ``host_ipc_server``/``IPCServerHost`` declare on a module's node."""
    return importlib.import_module(f'{PACKAGE}.node').DECLARED_PARAMETERS


def parameter_problems(launch_file: LaunchFile, root: Path = REPO) -> list[str]:
    """Parameters a node is given but does not declare, for every list of
    parameters it may get. A module node given the IPC server's config file
    hosts the IPC server: it declares what the hosting helper declares, too."""
    problems = []
    for node in launch_file.nodes:
        executable = launch_file.resolve(node.executable)
        if executable not in console_scripts():
            continue  # executable_problems() reports it
        where = f'{launch_file.path.name}:{node.line} ({executable})'
        for parameters in node.parameter_lists():
            declared = declared_parameters(executable)
            if IPC_SERVER_CONFIG in parameters:
                declared |= hosting_parameters()
            for item in parameters:
                if isinstance(item, dict) and all(isinstance(name, str) for name in item):
                    names = set(item)
                elif isinstance(item, ShareFile):
                    if not (root / item.relative).is_file():
                        continue  # config_problems() reports it
                    content = yaml.safe_load((root / item.relative).read_text())
                    names = {name for section in content.values() for name in section['ros__parameters']}
                else:
                    problems.append(f'{where}: cannot check parameters item {item!r}')
                    continue
                if not names <= declared:
                    problems.append(f'{where}: {sorted(names - declared)} not declared by the node')
    return sorted(set(problems), key=problems.index)


def required_problems(launch_file: LaunchFile) -> list[str]:
    """Nodes whose exit would not end the launch: ``on_exit`` must name a
    function of the launch file (which stops the launch)."""
    problems = []
    for node in launch_file.nodes:
        if not isinstance(node.on_exit, Function):
            problems.append(f'{launch_file.path.name}:{node.line}: no on_exit function of this file')
    return problems


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
        'module_executable': 'demo_module_node', 'host_ipc': 'false', 'servicers': ''}


def test_the_ipc_server_config_goes_to_ipc_server_or_to_the_hosting_module_node(
        module_ipc: LaunchFile) -> None:
    by_executable = {module_ipc.resolve(node.executable): node for node in module_ipc.nodes}
    assert set(by_executable) == {'demo_module_node', 'ipc_server'}
    ipc_server = by_executable['ipc_server'].parameter_lists()
    assert ipc_server and all(IPC_SERVER_CONFIG in parameters for parameters in ipc_server)
    module_node = by_executable['demo_module_node'].parameter_lists()
    # Separate server: module_name only; hosting (with or without servicers): the server's parameters.
    assert [{'module_name': Argument('module_name')}] in module_node
    assert sum(IPC_SERVER_CONFIG in parameters for parameters in module_node) == 2
    # servicers is given only when the argument names some (an empty list has no value in ROS).
    for parameters in ipc_server + module_node:
        for item in parameters:
            if isinstance(item, dict) and 'servicers' in item:
                assert item == {'servicers': Computed('_servicers')}


def test_servicers_argument_parsing(module_ipc: LaunchFile) -> None:
    parse = module_ipc.pure_function('_servicers', {'yaml': yaml, 'Any': Any})
    assert parse('') == [] and parse('  ') == [] and parse('[]') == []
    assert parse("['my_arm.arm_service:ArmService']") == ['my_arm.arm_service:ArmService']
    assert parse('[a.b:C, d.e:F]') == ['a.b:C', 'd.e:F']
    assert parse('my_arm.arm_service:ArmService') == ['my_arm.arm_service:ArmService']
    for wrong in ('{a: b}', '[1, 2]', '[a, [b]]', '~', '[unclosed'):
        with pytest.raises(ValueError, match=r'is not a list of .*servicers:="\[\'my_arm'):
            parse(wrong)


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
    assert console_scripts()['ipc_server'] == 'vyra_base_ipc.node:main'


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
        return f'{PACKAGE} is not installed in an ament prefix (FindPackageShare needs it): colcon build first'
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
    env = dict(ros_environ, VYRA_LAUNCH_FILE=str(_installed_launch_file('module_ipc.launch.py')),
               VYRA_LAUNCH_MODULE=module, VYRA_LAUNCH_ARGUMENTS=json.dumps(arguments))
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; from launch_testing.launch_test import main; sys.exit(main())',
         str(LAUNCH_TEST), '--junit-xml', str(tmp_path / 'launch_test.xml')],
        env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not Path(f'/tmp/{module}_ipc.sock').exists()
    assert not Path(f'/tmp/{module}_ipc.ttrpc.sock').exists()


@pytest.mark.ros
@pytest.mark.skipif(_launch_testing_missing() is not None, reason=str(_launch_testing_missing()))
def test_module_ipc_ends_with_1_when_ipc_server_fails_at_start(ros_environ: dict[str, str]) -> None:
    # An invalid module name: ipc_server exits 2 at start, the demo node would run on.
    result = subprocess.run(
        [sys.executable, '-c', ROS2_LAUNCH, str(_installed_launch_file('module_ipc.launch.py')),
         'module_name:=Not_Valid'],
        env=ros_environ, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert re.search(r'ipc_server-\d+ exited with status 2; the module cannot run without it', output), output
    assert "sending signal 'SIGINT' to process[demo_module_node" in output, output
    for pid in re.findall(r'process started with pid \[(\d+)\]', output):
        assert not Path(f'/proc/{pid}').exists() or 'Z' in Path(f'/proc/{pid}/stat').read_text().split()[2], \
            f'process {pid} still runs:\n{output}'
