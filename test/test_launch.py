"""Launch files: consistency checks that always run (the files are parsed
with ``ast``, never imported: launch/launch_ros are not installable here),
and a launch_testing run of every launch file where launch_ros exists.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fnmatch import fnmatch
import importlib
import importlib.util
import os
from pathlib import Path
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


@dataclass
class LaunchNode:
    line: int
    package: Any = None
    executable: Any = None
    parameters: list[Any] = field(default_factory=list)


class LaunchFile:
    """The launch arguments, nodes and files of one launch file, read with ``ast``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tree = ast.parse(path.read_text(), str(path))
        self.variables: dict[str, ast.expr] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name):
                self.variables[node.targets[0].id] = node.value
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
                    if keyword.arg in ('package', 'executable'):
                        setattr(launch_node, keyword.arg, self.value(keyword.value))
                    elif keyword.arg == 'parameters':
                        launch_node.parameters = self.value(keyword.value)
                self.nodes.append(launch_node)
            elif name == 'PathJoinSubstitution':
                self.share_files.append(self.value(node))

    def value(self, node: ast.expr) -> Any:
        """Evaluate the launch-file subset this package uses; fail on anything else."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.variables:
            return self.value(self.variables[node.id])
        if isinstance(node, ast.List):
            return [self.value(element) for element in node.elts]
        if isinstance(node, ast.Dict):
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name == 'LaunchConfiguration':
                return Argument(self.value(node.args[0]))
            if name == 'FindPackageShare':
                return ('share', self.value(node.args[0]))
            if name == 'PathJoinSubstitution':
                parts = self.value(node.args[0])
                assert isinstance(parts[0], tuple) and parts[0][0] == 'share', \
                    f'{self.path.name}:{node.lineno}: paths must start at FindPackageShare(...)'
                assert all(isinstance(part, str) for part in parts[1:]), \
                    f'{self.path.name}:{node.lineno}: path parts must be literals'
                return ShareFile(parts[0][1], '/'.join(parts[1:]))
        raise AssertionError(f'{self.path.name}:{node.lineno}: cannot check '
                             f'{ast.unparse(node)!r} without running launch')

    def resolve(self, value: Any) -> Any:
        """A launch argument's default, else the value itself."""
        if isinstance(value, Argument):
            assert value.name in self.arguments, f'{self.path.name}: undeclared argument {value.name}'
            return self.arguments[value.name]
        return value


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


def parameter_problems(launch_file: LaunchFile, root: Path = REPO) -> list[str]:
    problems = []
    for node in launch_file.nodes:
        executable = launch_file.resolve(node.executable)
        if executable not in console_scripts():
            continue  # executable_problems() reports it
        declared = declared_parameters(executable)
        where = f'{launch_file.path.name}:{node.line} ({executable})'
        for item in node.parameters:
            if isinstance(item, dict):
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
        given = [item.get('module_name') for item in node.parameters if isinstance(item, dict)]
        assert Argument('module_name') in given, f'{launch_file.path.name}:{node.line}'


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


@pytest.mark.ros
@pytest.mark.skipif(_launch_testing_missing() is not None, reason=str(_launch_testing_missing()))
@pytest.mark.parametrize('path', LAUNCH_FILES, ids=[path.name for path in LAUNCH_FILES])
def test_launch_file_runs_under_launch_testing(path: Path, ros_environ: dict[str, str],
                                              tmp_path: Path) -> None:
    from ament_index_python.packages import get_package_share_directory

    installed = Path(get_package_share_directory(PACKAGE)) / 'launch' / path.name
    module = f'launch{uuid.uuid4().hex[:10]}'
    env = dict(ros_environ, VYRA_LAUNCH_FILE=str(installed), VYRA_LAUNCH_MODULE=module)
    result = subprocess.run(
        [sys.executable, '-c', 'import sys; from launch_testing.launch_test import main; sys.exit(main())',
         str(LAUNCH_TEST), '--junit-xml', str(tmp_path / 'launch_test.xml')],
        env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not Path(f'/tmp/{module}_ipc.sock').exists()
    assert not Path(f'/tmp/{module}_ipc.ttrpc.sock').exists()
