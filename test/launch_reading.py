"""Reading launch files without launch: what setup.py installs and declares,
and the launch arguments, nodes, parameters and files of a launch file, read
with ``ast`` (launch/launch_ros are not installable from the package index).
Used by test_launch.py; not collected itself.

The reading evaluates the subset of launch-file syntax this package uses and
fails on anything else: literals, names bound once, lists (with ``*``
splices), dicts, ``a if c else b`` (every branch is checked),
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
import os
from pathlib import Path
from typing import Any

import yaml

from ros_env import REPO

PACKAGE = 'vyra_base_ipc'


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


#: What rclpy declares on every node.
NODE_PARAMETERS = frozenset({'use_sim_time'})


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
    #: The node name given (``None``: the one in the executable's code).
    name: Any = None
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
        #: The ``choices`` of the arguments that have them.
        self.choices: dict[str, list[str]] = {}
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
                choices = next((k.value for k in node.keywords if k.arg == 'choices'), None)
                if choices is not None:
                    self.choices[self.value(node.args[0])] = self.value(choices)
            elif name == 'Node':
                launch_node = LaunchNode(line=node.lineno)
                for keyword in node.keywords:
                    if keyword.arg in ('package', 'executable', 'name', 'parameters', 'on_exit'):
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
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values, strict=True)}
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



# -- what is wrong with one ------------------------------------------------------


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


#: Functions of a launch file that return a parameter file the user names at
#: launch time (a launch argument): its contents cannot be checked here.
USER_PARAMETER_FILES = frozenset({'_params_file'})


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
            declared = declared_parameters(executable) | NODE_PARAMETERS
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
                elif isinstance(item, Computed) and item.function in USER_PARAMETER_FILES:
                    continue
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
