"""The public API as a typed user sees it: a module package's code (my_arm's
protos, generated as its build generates them, installed with ``py.typed``)
checked with ``mypy --strict`` against this package as installed.

Each user file is checked whole: ``assert_type`` states what a name must be,
and a line ending in ``# error: [code]`` must be reported with that code;
any other report fails the test. So an ``Any`` where the type is known, a
misuse that type checkers let through, or an import path without types
shows up here, before a user finds it."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path
import re
import subprocess
import sys
import textwrap
from types import ModuleType
import typing
from typing import Any, Callable, Iterator

import pytest
from rclpy.context import Context
from rclpy.node import Node

from test_build_helper import copy_example
import vyra_base.com.handler.ipc as documented
import vyra_base_ipc
import vyra_base_ipc.node
from vyra_base_ipc.node import IPCServerHost, ParameterError
import vyra_base_ipc.ros_bridge
import vyra_base_ipc_build

ROOT = Path(__file__).resolve().parent.parent
MY_ARM_PROTOS = ROOT / 'examples' / 'my_arm' / 'protos'

HEADER = """\
from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

from my_arm.arm_pb2 import (CameraFrame, FrameRequest, ImageRequest, ImageStats, JointState, MoveReply,
                            MoveRequest, WatchRequest)
from my_arm.arm_pb2_grpc import ArmServiceServicer, ArmServiceStub
"""

USER_FILES = {
    # A frontend (FastAPI, a worker): the asyncio client on the module's own stub.
    'frontend': """
from vyra_base_ipc import IPCHandler, SharedBuffer, SharedBufferRef


async def frontend() -> ImageStats:
    async with IPCHandler(module_name='my_arm', service_stub=ArmServiceStub) as arm:
        assert_type(arm, IPCHandler)
        moved = await arm.call_method('Move', MoveRequest(pose='ready'), response_type=MoveReply)
        assert_type(moved, MoveReply)
        async for state in arm.stream_method('WatchJoints', WatchRequest(count=3), response_type=JointState,
                                             timeout=None, idle_timeout=1.0):
            assert_type(state, JointState)
        with SharedBuffer.copy_from(bytes(1024)) as image:
            assert_type(image.ref, SharedBufferRef)
            return await arm.call_method('InspectImage', ImageRequest(image=image.ref), buffers=[image],
                                         response_type=ImageStats)
""",
    # A servicer answering with shared memory, as the README shows it.
    'servicer': """
from vyra_base_ipc import SharedBuffer, attach_buffers, received_buffer, shared_buffer


class Arm(ArmServiceServicer):
    def InspectImage(self, request: ImageRequest, context: Any) -> ImageStats:
        image = shared_buffer(request.image, context)
        assert_type(image, memoryview)
        return attach_buffers(context, ImageStats(size=len(image)), received_buffer(request.image, context))

    async def GetCameraFrame(self, request: FrameRequest, context: Any) -> CameraFrame:
        with SharedBuffer.allocate(64) as rgb:
            reply = attach_buffers(context, CameraFrame(width=8, height=8), rgb)
            assert_type(reply, CameraFrame)
            return reply


def mistaken(buffer: SharedBuffer, context: Any) -> None:
    shared_buffer(buffer, context)  # error: [arg-type]
    received_buffer(buffer, context)  # error: [arg-type]
""",
    # Handlers typed with grpc's own context classes, as the README says: the
    # subset both lanes provide type-checks, what grpc.aio's lacks does not.
    'typed_contexts': """
import grpc
import grpc.aio


class Arm(ArmServiceServicer):
    async def Move(self, request: MoveRequest, context: grpc.aio.ServicerContext[MoveRequest, MoveReply]
                   ) -> MoveReply:
        if context.time_remaining() is None or context.cancelled():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, 'give the call a deadline')
        context.set_details(str(dict(context.invocation_metadata() or ())))
        return MoveReply(reached=True, pose=request.pose)

    def InspectImage(self, request: ImageRequest, context: grpc.ServicerContext) -> ImageStats:
        if not context.is_active():
            context.abort(grpc.StatusCode.CANCELLED, 'the caller left')
        context.add_callback(lambda: None)
        return ImageStats(size=len(context.peer()))


async def not_on_the_grpc_lane(context: grpc.aio.ServicerContext[MoveRequest, MoveReply]) -> None:
    context.is_active()  # error: [attr-defined]
    context.add_callback(lambda: None)  # error: [attr-defined]
""",
    # An rclpy node's callback, through the import path VYRA documents.
    'documented_path': """
from rclpy.node import Node

from vyra_base.com.handler.ipc import (IPCServer, ModuleService, SyncIPCHandler, UnsafeDirectoryError,
                                       UntrustedServerError, command, run)
from vyra_base_ipc.node import IPCServerHost


class ArmModule(ModuleService):
    @command('home')
    def home(self, parameters: dict[str, str]) -> str:
        return 'homed'


def callback(arm: SyncIPCHandler) -> MoveReply | None:
    try:
        reply = arm.call_method('Move', MoveRequest(pose='home'), response_type=MoveReply)
    except UntrustedServerError:
        return None
    assert_type(reply, MoveReply)
    return reply


def serve() -> None:
    try:
        run(IPCServer(module_name='my_arm', servicers=[ArmModule('my_arm')]).serve())
    except UnsafeDirectoryError as error:
        assert_type(error, UnsafeDirectoryError)


def hosted(node: Node, module_name: str | None) -> IPCServerHost:
    # module_name as IPCServer takes it: None is "none given".
    return IPCServerHost(node, [ArmModule('my_arm')], module_name=module_name)
""",
    # The module package's setup.py.
    'setup_helper': """
from vyra_base_ipc_build import generate_protos, proto_cmdclass, proto_data_files

assert_type(proto_data_files('my_arm'), list[tuple[str, list[str]]])
assert_type(proto_cmdclass(), dict[str, type[Any]])
assert_type(generate_protos('protos', 'out'), list[str])
""",
}

#: What the clients let type checkers see (each was Any, or passed, before).
CLIENT_FILES = {
    # return_buffers=True answers (response, ReceivedBuffers): typed as Any.
    'returned_buffers': """
from vyra_base_ipc import IPCHandler, ReceivedBuffers, SyncIPCHandler


async def frame(arm: IPCHandler) -> None:
    reply, received = await arm.call_method('GetCameraFrame', FrameRequest(), response_type=CameraFrame,
                                            return_buffers=True)
    assert_type(reply, CameraFrame)
    assert_type(received, ReceivedBuffers)


def frame_blocking(arm: SyncIPCHandler) -> None:
    reply, received = arm.call_method('GetCameraFrame', FrameRequest(), response_type=CameraFrame,
                                      return_buffers=True)
    assert_type(reply, CameraFrame)
    assert_type(received, ReceivedBuffers)
    untyped = arm.call_method('GetCameraFrame', FrameRequest(), return_buffers=True)
    assert_type(untyped, tuple[Any, ReceivedBuffers])
""",
    # lane is a str, not a Literal: it comes from argparse or a ROS parameter as
    # one (my_arm's frontend), and a wrong one is a ValueError naming the three.
    'lane_from_configuration': """
from vyra_base_ipc import IPCHandler, SyncIPCHandler


def lanes(lane: str) -> None:
    IPCHandler(module_name='my_arm', service_stub=ArmServiceStub, lane=lane)
    SyncIPCHandler(module_name='my_arm', service_stub=ArmServiceStub, lane=lane)
""",
    # A module's own client class keeps its type through `with`.
    'subclassed_client': """
from vyra_base_ipc import IPCHandler, SyncIPCHandler


class ArmClient(IPCHandler):
    async def move(self, pose: str) -> MoveReply:
        return await self.call_method('Move', MoveRequest(pose=pose), response_type=MoveReply)


class BlockingArmClient(SyncIPCHandler):
    pass


async def use() -> None:
    async with ArmClient(module_name='my_arm', service_stub=ArmServiceStub) as arm:
        assert_type(arm, ArmClient)
    with BlockingArmClient(module_name='my_arm', service_stub=ArmServiceStub) as blocking:
        assert_type(blocking, BlockingArmClient)
""",
}

EXPECTED_ERROR = re.compile(r'# error: \[([a-z-]+)\]$')
REPORT = re.compile(r'^(\w+)\.py:(\d+): error: (.*)  \[([a-z-]+)\]$', re.MULTILINE)


def expected_errors(source: str) -> set[tuple[int, str]]:
    """``(line, code)`` of every line marked ``# error: [code]``."""
    return {(number, match[1]) for number, line in enumerate(source.splitlines(), 1)
            if (match := EXPECTED_ERROR.search(line))}


def package_root(module: ModuleType) -> str:
    """The directory a module's top-level package is imported from (a path entry)."""
    path = Path(str(module.__file__))
    return str(path.parents[module.__name__.count('.') + (path.name == '__init__.py')])


def mypy_strict(directory: Path, *targets: str, installed: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``targets`` from ``directory``, as a user runs it: configured only by the
    directory's ``pyproject.toml`` if it has one (the example module's), this package as installed
    (with ``installed``, where the module's code is, on PYTHONPATH). A ``my_arm`` installed in this
    environment is left off the path: the one under test is used."""
    config = directory / 'pyproject.toml'
    if not config.is_file():
        config = directory / 'mypy.ini'
        config.write_text('[mypy]\n')
    ours = [package_root(vyra_base_ipc), package_root(documented), package_root(vyra_base_ipc_build)]
    others = [path for path in os.environ.get('PYTHONPATH', '').split(os.pathsep)
              if path and not (Path(path) / 'my_arm').is_dir()]
    paths = list(dict.fromkeys([*([str(installed)] if installed else []), *ours, *others]))
    result = subprocess.run([sys.executable, '-m', 'mypy', '--strict', '--config-file', config.name,
                             '--python-version', '3.11', '--cache-dir', str(directory / '.mypy_cache'), *targets],
                            cwd=directory, env={**os.environ, 'PYTHONPATH': os.pathsep.join(paths)},
                            capture_output=True, text=True, timeout=300)
    assert 'error: ' not in result.stderr, result.stderr
    return result


@pytest.fixture(scope='module')
def mypy_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[tuple[int, str]], str]]:
    """The errors ``mypy --strict`` reports in each user file: the module's code installed
    (on PYTHONPATH, with py.typed), this package as installed."""
    installed = tmp_path_factory.mktemp('site')
    vyra_base_ipc_build.generate_protos(MY_ARM_PROTOS, installed, packages=['my_arm'])
    (installed / 'my_arm' / '__init__.py').write_text('')
    (installed / 'my_arm' / 'py.typed').write_text('')
    user = tmp_path_factory.mktemp('user')
    files = {**USER_FILES, **CLIENT_FILES}
    for name, body in files.items():
        (user / f'{name}.py').write_text(HEADER + body)
    result = mypy_strict(user, *(f'{name}.py' for name in files), installed=installed)
    found: dict[str, set[tuple[int, str]]] = {name: set() for name in files}
    for match in REPORT.finditer(result.stdout):
        found.setdefault(match[1], set()).add((int(match[2]), match[4]))
    return {name: (lines, result.stdout) for name, lines in found.items()}


def check_user_file(mypy_reports: dict[str, tuple[set[tuple[int, str]], str]], name: str, source: str) -> None:
    """Mypy reported exactly the errors ``source`` marks."""
    found, output = mypy_reports[name]
    offset = HEADER.count('\n')
    expected = {(line + offset, code) for line, code in expected_errors(source)}
    assert found == expected, f'mypy --strict on {name}.py (lines count from the header):\n{output}'


@pytest.mark.linter
@pytest.mark.parametrize('name', USER_FILES)
def test_mypy_strict_sees_the_types_a_user_means(mypy_reports: dict[str, tuple[set[tuple[int, str]], str]],
                                                 name: str) -> None:
    check_user_file(mypy_reports, name, USER_FILES[name])


@pytest.mark.linter
@pytest.mark.parametrize('name', CLIENT_FILES)
def test_mypy_strict_sees_the_types_of_the_clients(mypy_reports: dict[str, tuple[set[tuple[int, str]], str]],
                                                   name: str) -> None:
    check_user_file(mypy_reports, name, CLIENT_FILES[name])


@pytest.mark.linter
def test_a_module_copied_from_the_example_passes_mypy_strict_with_its_generated_code(tmp_path: Path) -> None:
    """The source tree as ``colcon build --symlink-install`` leaves it: the generated code beside
    the module's own, all checked. protoc's code has no annotations (``_pb2_grpc.py``) and bare
    generics (``.pyi``): errors the module cannot fix, each generated file says to skip them."""
    arm = copy_example(tmp_path / 'my_arm')
    subprocess.run([sys.executable, 'setup.py', '-q', 'generate_protos'], cwd=arm, check=True,
                   capture_output=True, timeout=120)
    assert (arm / 'my_arm' / 'arm_pb2_grpc.py').is_file()
    result = mypy_strict(arm, '-p', 'my_arm')
    assert 'Success: no issues found in' in result.stdout, result.stdout


@pytest.mark.ros
@pytest.mark.parametrize('given', [None, ''])
def test_a_host_takes_module_name_none_as_the_server_does(context: Context, given: str | None) -> None:
    # None was rclpy's "Cannot declare a statically typed parameter with default value of type
    # PARAMETER_NOT_SET", naming neither the parameter nor the argument.
    node = Node('none_given', context=context)
    try:
        host = IPCServerHost(node, module_name=given)
        try:
            assert node.get_parameter('module_name').value == ''
            with pytest.raises(ParameterError, match="parameter 'module_name': is empty on node"):
                host.start()
        finally:
            host.close()
    finally:
        node.destroy_node()


def test_the_documented_import_path_re_exports_the_whole_public_api() -> None:
    assert sorted(documented.__all__) == sorted(vyra_base_ipc.__all__)
    for name in vyra_base_ipc.__all__:
        assert getattr(documented, name) is getattr(vyra_base_ipc, name), name


# -- unparameterised generics in public signatures -----------------------------

#: A generic class named without its parameters: ``list`` is ``list[Unknown]``
#: to pyright (Pylance), whose strict mode then reports every use of the
#: function as "partially unknown"; mypy --strict says nothing of it in a
#: library.
BARE = (list, dict, set, frozenset, tuple, type)
def bare_generics(hint: Any) -> Iterator[Any]:
    """The generics in ``hint`` named without their parameters."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if hint in BARE or (isinstance(hint, type) and getattr(hint, '__parameters__', ())):
            yield hint
        return
    if not args and origin is not tuple:
        yield hint
    for arg in args:
        for part in (arg if isinstance(arg, list) else [arg]):  # (Callable's parameter list)
            if part is not Ellipsis:
                yield from bare_generics(part)


def public_functions(module: ModuleType) -> Iterator[tuple[str, Callable[..., Any]]]:
    """The functions of ``module.__all__``, and the public methods and properties of its classes."""
    for name in module.__all__:
        item = getattr(module, name)
        if inspect.isfunction(item):
            yield name, item
        elif inspect.isclass(item) and item.__module__.startswith('vyra_base_ipc'):
            for attribute, member in vars(item).items():
                member = member.fget if isinstance(member, property) else member
                member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(member) and (attribute == '__init__' or not attribute.startswith('_')):
                    yield f'{name}.{attribute}', member


def type_checking_imports(module: ModuleType) -> set[str]:
    """The names ``module`` imports only ``if TYPE_CHECKING:``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == 'TYPE_CHECKING':
            names.update(alias.asname or alias.name for statement in node.body
                         if isinstance(statement, (ast.Import, ast.ImportFrom)) for alias in statement.names)
    return names


def hints(function: Callable[..., Any]) -> dict[str, Any]:
    """``function``'s annotations, as ``typing.get_type_hints`` gives them to tools that read them
    at run time (each evaluated anew: a ``localns`` bypasses the cache a first evaluation elsewhere
    leaves); the names its module imports only for type checkers stand for a plain class.

    :raises NameError: an annotation names what its module does not define.
    """
    unresolved: dict[str, Any] = {}
    allowed = type_checking_imports(sys.modules[function.__module__])
    while True:
        try:
            return typing.get_type_hints(function, localns=unresolved)
        except NameError as error:
            if error.name not in allowed or error.name in unresolved:
                raise
            unresolved[error.name] = type(error.name, (), {})


PUBLIC_MODULES = (vyra_base_ipc, vyra_base_ipc.node, vyra_base_ipc.ros_bridge, vyra_base_ipc_build)


def test_public_annotations_resolve_at_run_time() -> None:
    """What pydantic, FastAPI's dependencies, typer or sphinx read: ``get_type_hints`` of each
    public function works in the module that defines it."""
    failing = {}
    for module in PUBLIC_MODULES:
        for name, function in public_functions(module):
            try:
                hints(function)
            except NameError as error:
                failing[f'{module.__name__}.{name}'] = str(error)
    assert not failing


def bare_in_public_signatures() -> dict[str, dict[str, list[Any]]]:
    found: dict[str, dict[str, list[Any]]] = {}
    for module in PUBLIC_MODULES:
        for name, function in public_functions(module):
            for parameter, hint in hints(function).items():
                if bare := list(bare_generics(hint)):
                    found.setdefault(f'{name}', {})[parameter] = bare
    return found


def test_public_signatures_name_every_generic_with_its_parameters() -> None:
    assert not bare_in_public_signatures()


# -- exceptions a public function raises, and its docstring ---------------------

def caught(handlers: list[ast.ExceptHandler]) -> set[str]:
    """The exception names ``except`` clauses catch (their last dotted part)."""
    names: set[str] = set()
    for handler in handlers:
        for node in ast.walk(handler.type) if handler.type else ():
            if isinstance(node, (ast.Name, ast.Attribute)):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return names


def raised_directly(node: ast.AST, handled: frozenset[str] = frozenset()) -> Iterator[str]:
    """The exception classes ``raise``d in ``node``'s own body (not in nested functions), but
    for those an enclosing ``try`` of its catches."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(child, ast.Raise) and child.exc is not None:
            error = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
            name = error.id if isinstance(error, ast.Name) else getattr(error, 'attr', '')
            if name[:1].isupper() and name not in handled:
                yield name
        if isinstance(child, ast.Try):
            for statement in child.body:
                yield from raised_directly(ast.Module([statement], []), handled | caught(child.handlers))
            for part in (*child.handlers, *child.orelse, *child.finalbody):
                yield from raised_directly(ast.Module([part], []), handled)
        else:
            yield from raised_directly(child, handled)


def undocumented_raises() -> dict[str, list[str]]:
    """Public functions and methods that raise an exception their docstring (or, for
    ``__init__``, their class's) never names."""
    found = {}
    for module in PUBLIC_MODULES:
        for name, function in public_functions(module):
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
            except OSError:  # made at run time (a dataclass's __init__): raises nothing of its own
                continue
            owner = getattr(module, name.split('.')[0])
            doc = (function.__doc__ or '') + (owner.__doc__ or '' if name.endswith('.__init__') else '')
            if missing := sorted({error for error in raised_directly(tree) if error not in doc}):
                found[f'{module.__name__}.{name}'] = missing
    return found


@pytest.mark.linter
def test_every_exception_a_public_function_raises_is_in_its_docstring() -> None:
    assert not undocumented_raises()
