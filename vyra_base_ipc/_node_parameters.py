"""The IPC server's ROS 2 parameters: one table (:data:`PARAMETERS`) that the
``ipc_server`` node, the embedding helper, the launch files and their tests
follow, how they are declared on a node, and how their values are checked
(:func:`read_ipc_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
import importlib
import os
from pathlib import Path
import re
from typing import Any, Callable, Mapping

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ._allocator import DEFAULT_KEEP_FREED_MEMORY
from ._busy_poll import DEFAULT_BUSY_POLL
from ._methods import find_add_function
from ._options import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES, MAX_SECONDS, validate_max_message_bytes
from ._payload import DEFAULT_SHARED_MEMORY_THRESHOLD, SharedMemoryOptions
from .address import (
    MODULE_NAME_ENVS,
    default_ttrpc_socket_path,
    resolve_socket_path,
    validate_module_name,
    validate_socket_path,
)
from .exceptions import ParameterError

# ParameterError is defined in .exceptions, importable from here too.
__all__ = [
    'DECLARED_PARAMETERS',
    'IPCServerConfig',
    'PARAMETERS',
    'ParameterError',
    'ParameterSpec',
    'declare_ipc_parameters',
    'load_servicer',
    'parameter_value',
    'read_ipc_config',
]

#: Seconds between two status messages on /diagnostics (diagnostic_updater's default).
DEFAULT_DIAGNOSTICS_PERIOD = 1.0

_SERVICER_SPEC = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$')


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of the IPC server: name, type, default, description.

    :ivar default: the default value (every parameter has one, so that
        ``ros2 param dump`` and ``get`` list them all: rclpy answers a
        request naming a parameter without a value with nothing at all).
    :ivar dynamic_typing: declared with dynamic typing: rclpy takes the type
        of an empty list default for BYTE_ARRAY whatever the descriptor says
        (ros2/rclpy#912), so an empty string array can only be declared this
        way; :func:`read_ipc_config` checks the type instead.
    """

    name: str
    type: Parameter.Type
    default: Any
    description: str
    read_only: bool = True
    dynamic_typing: bool = False

    def descriptor(self) -> ParameterDescriptor:
        """The ROS descriptor this parameter is declared with."""
        return ParameterDescriptor(name=self.name, type=self.type.value,
                                   description=self.description, read_only=self.read_only,
                                   dynamic_typing=self.dynamic_typing)


#: The parameters of the IPC server: the one table that :class:`IPCServerNode`,
#: :class:`IPCServerHost`, the launch files and their tests follow.
PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        'module_name', Parameter.Type.STRING, '',
        'Name of the VYRA module (^[a-z][a-z0-9_]*$). Names the default socket '
        '/tmp/<module_name>_ipc.sock and is reported by ModuleService. Set it with the launch '
        'argument module_name:=<name> or -p module_name:=<name>; else it is taken from '
        f'{" or ".join(MODULE_NAME_ENVS)} in the environment, else from the default a hosting '
        "node gives in code (host_ipc_server(node, module_name='<name>'))."),
    ParameterSpec(
        'socket_path', Parameter.Type.STRING, '',
        'Unix socket to serve on (at most 107 bytes; relative paths are made absolute against the '
        'working directory; a leading ~ is refused, as ROS does not expand it). '
        'Empty: VYRA_IPC_SOCKET if set, else derived from module_name.'),
    ParameterSpec(
        'ttrpc_enabled', Parameter.Type.BOOL, True,
        'Serve the fast lane too: the same services over ttrpc framing on a second socket, '
        'which IPCHandler and SyncIPCHandler use when it answers (several times faster than '
        'the gRPC lane for small calls).'),
    ParameterSpec(
        'ttrpc_socket_path', Parameter.Type.STRING, '',
        'Unix socket of the fast lane. Empty: beside socket_path with the suffix .ttrpc.sock '
        '(/tmp/demo_ipc.sock -> /tmp/demo_ipc.ttrpc.sock).'),
    ParameterSpec(
        'shared_memory_enabled', Parameter.Type.BOOL, True,
        'On the fast lane, pass messages above shared_memory_threshold to and from this '
        "package's clients as sealed shared memory (memfd) instead of through the socket."),
    ParameterSpec(
        'shared_memory_threshold', Parameter.Type.INTEGER, DEFAULT_SHARED_MEMORY_THRESHOLD,
        'Messages of more than this many bytes travel as shared memory (>= 0).'),
    ParameterSpec(
        'busy_poll_us', Parameter.Type.INTEGER, round(DEFAULT_BUSY_POLL * 1e6),
        'Microseconds the server polls for the next request before it sleeps (0 to 10000; '
        '0: never). Saves the wakeup of a sleeping process, the largest part of a small '
        'call; costs at most this much CPU per call, and only while calls come that close '
        'together. Never polls on a machine with one CPU.'),
    ParameterSpec(
        'keep_freed_memory_mb', Parameter.Type.INTEGER, DEFAULT_KEEP_FREED_MEMORY >> 20,
        'MiB of freed memory this process keeps for reuse instead of giving it back to the '
        'kernel, with large blocks served from the heap (vyra_base_ipc.keep_freed_memory; '
        "glibc's mallopt, as ROS 2's real-time guide does): large messages then stop paying "
        'page faults for fresh memory on every call (0 to 2047; 0: leave malloc as it is; '
        'ipc_server gives its threads one malloc arena either way).'),
    ParameterSpec(
        'servicers', Parameter.Type.STRING_ARRAY, [],
        'Extra gRPC servicers as package.module:ClassName, imported and created with no '
        'arguments, served beside the default ModuleService (a ModuleService subclass among '
        'them replaces the default). A servicer with an attach_ipc_host(host) method gets '
        'the hosting IPCServerHost before the server starts.', dynamic_typing=True),
    ParameterSpec(
        'grace_period', Parameter.Type.DOUBLE, DEFAULT_GRACE_PERIOD,
        'Seconds in-flight calls get to finish when the server stops (>= 0). May be changed '
        'while running; the value at stop time counts.', read_only=False),
    ParameterSpec(
        'max_message_bytes', Parameter.Type.INTEGER, DEFAULT_MAX_MESSAGE_BYTES,
        'Largest message the server sends or accepts, in bytes (1 to 2147483647). Clients '
        'must allow at least as much.'),
    ParameterSpec(
        'maximum_concurrent_rpcs', Parameter.Type.INTEGER, 0,
        'Calls in flight per lane beyond which a new call is refused at once with '
        'RESOURCE_EXHAUSTED, counted in the metrics and turning /diagnostics WARN (0 to '
        '2147483647; 0: no limit).'),
    ParameterSpec(
        'diagnostics_period', Parameter.Type.DOUBLE, DEFAULT_DIAGNOSTICS_PERIOD,
        'Seconds between the IPC server status messages on /diagnostics '
        '(diagnostic_msgs/DiagnosticArray, as rqt_robot_monitor shows them): OK while serving, '
        'WARN on many errors or saturation, ERROR when not serving; with connections, calls/s, '
        'errors/s and p50/p99 latency (0 to 3600; 0: none).'),
)

#: Names of :data:`PARAMETERS`.
DECLARED_PARAMETERS: frozenset[str] = frozenset(spec.name for spec in PARAMETERS)


@dataclass(frozen=True)
class IPCServerConfig:
    """The checked parameter values of one IPC server."""

    module_name: str
    socket_path: Path
    #: None when the fast lane is switched off.
    ttrpc_socket_path: Path | None
    servicers: tuple[str, ...]
    grace_period: float
    max_message_bytes: int
    #: None when shared memory is switched off (or the fast lane is).
    shared_memory: SharedMemoryOptions | None = None
    #: Seconds the server's event loop polls before it sleeps.
    busy_poll: float = DEFAULT_BUSY_POLL
    #: Seconds between status messages on /diagnostics; 0: none.
    diagnostics_period: float = DEFAULT_DIAGNOSTICS_PERIOD
    #: Bytes of freed memory the process keeps (keep_freed_memory); 0: malloc left alone.
    keep_freed_memory: int = DEFAULT_KEEP_FREED_MEMORY
    #: Calls in flight per lane beyond which calls are refused; None: no limit.
    maximum_concurrent_rpcs: int | None = None


def declare_ipc_parameters(node: Node, *, module_name: str = '',
                           environ: Mapping[str, str] | None = None) -> None:
    """Declare :data:`PARAMETERS` on ``node``, skipping names it declared already
    (a module node may have its own ``module_name``).

    ``module_name`` is declared with the first of these as its default, so an
    override (``-p``, parameter file, launch argument) wins, and the parameter
    shows the name in use: :data:`~vyra_base_ipc.address.MODULE_NAME_ENVS` in
    ``environ`` (default: ``os.environ``), then the ``module_name`` argument
    (a default in code), then ``''`` (:func:`read_ipc_config` then refuses it).

    A DOUBLE parameter takes an integer too, as a number of seconds written
    ``2`` rather than ``2.0``: an override (``-p grace_period:=2``) and a later
    set (``ros2 param set /ipc_server grace_period 2``) are made the double
    ``2.0`` before rclpy checks the type, which rclpy would refuse. The
    parameter stays a DOUBLE for ``ros2 param describe`` and ``get``. A set is
    converted before the node's own pre-set callbacks run, which see and
    return the double; none is added beside them (see
    :func:`_convert_integers_before_pre_set_callbacks`).

    :raises ParameterError: an override has the wrong type; the remaining
        parameters are still declared.
    """
    defaults = {'module_name': _module_name_from_environment(environ) or module_name}
    first_error: ParameterError | None = None
    doubles: set[str] = set()
    for spec in PARAMETERS:
        if node.has_parameter(spec.name):
            continue
        default = defaults.get(spec.name, spec.default)
        if spec.type is Parameter.Type.DOUBLE:
            doubles.add(spec.name)
            given = _integer_override(node, spec.name)
            if given is not None:
                node.declare_parameter(spec.name, float(given), spec.descriptor(), ignore_override=True)
                continue
        try:
            node.declare_parameter(spec.name, default, spec.descriptor())
        except InvalidParameterTypeException as error:
            if first_error is None:
                first_error = ParameterError(spec.name, _type_reason(spec, error))
            # Declare it with its default so that the node is complete anyway.
            node.declare_parameter(spec.name, default, spec.descriptor(), ignore_override=True)
    if doubles:
        _convert_integers_before_pre_set_callbacks(node, doubles)
    if first_error is not None:
        raise first_error


class _IntegersAsDoubles:
    """``node._call_pre_set_parameters_callback`` of a node with IPC server
    parameters: the parameters being set, their integers for :attr:`doubles`
    made doubles, go through the node's own pre-set callbacks (the method it
    replaces), whose result is converted the same way."""

    def __init__(self, call: Callable[[list[Parameter[Any]]], list[Parameter[Any]] | None],
                 doubles: set[str]) -> None:
        self.call = call
        self.doubles = doubles

    def __call__(self, parameters: list[Parameter[Any]]) -> list[Parameter[Any]] | None:
        converted = _integers_as_doubles(parameters, self.doubles)
        modified = self.call(converted)
        if modified is not None:
            return _integers_as_doubles(modified, self.doubles)
        # (None: no pre-set callbacks, rclpy sets the list it has; else the converted one.)
        return converted if any(a is not b for a, b in zip(converted, parameters, strict=True)) else None


def _convert_integers_before_pre_set_callbacks(node: Node, doubles: set[str]) -> None:
    """Have every set of ``node``'s parameters take integers for ``doubles``.

    Not with ``node.add_pre_set_parameters_callback``: rclpy hands each
    pre-set callback the list being set and sets what they return *joined*
    (rclpy ``Node._call_pre_set_parameters_callback``), so beside a callback
    of the hosting node's own, each parameter was set twice: the integer
    its callback returned was refused as no DOUBLE, and what its callback
    changed (a speed limited to 10) was set back to the value asked for
    whenever ours came later. So the conversion runs before the node's own
    callbacks, in the one method that calls them all. Should rclpy lose that
    method, a callback of our own is added as before.
    """
    current = getattr(node, '_call_pre_set_parameters_callback', None)
    if isinstance(current, _IntegersAsDoubles):  # (declared on this node before: one conversion)
        current.doubles |= doubles
    elif callable(current):
        node._call_pre_set_parameters_callback = _IntegersAsDoubles(current, set(doubles))  # type: ignore[method-assign,assignment]
    else:
        node.add_pre_set_parameters_callback(lambda parameters: _integers_as_doubles(parameters, doubles))


def _integer_override(node: Node, name: str) -> int | None:
    """The integer ``node`` was given for parameter ``name`` (``-p``, a
    parameter file, a launch file), else ``None``."""
    # rclpy applies overrides only inside declare_parameter() and has no public
    # accessor for them; without this attribute an integer is refused as before.
    overrides = getattr(node, '_parameter_overrides', None)
    given = overrides.get(name) if isinstance(overrides, dict) else None
    if isinstance(given, Parameter) and given.type_ is Parameter.Type.INTEGER:
        value = given.value
        return value if isinstance(value, int) else None
    return None


def _integers_as_doubles(parameters: list[Parameter[Any]], doubles: set[str]) -> list[Parameter[Any]]:
    """``parameters`` with each INTEGER value for one of ``doubles`` made that
    number as a DOUBLE (an rclpy pre-set callback, run before the type check)."""
    return [Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
            if parameter.name in doubles and parameter.type_ is Parameter.Type.INTEGER else parameter
            for parameter in parameters]


def _type_reason(spec: ParameterSpec, error: InvalidParameterTypeException) -> str:
    # rclpy's message names the value and both types; the exception has no fields for them.
    detail = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    detail = detail.removesuffix(f': {spec.name}')
    hint = {
        Parameter.Type.STRING_ARRAY: " (write ['package.module:ClassName'])",
    }.get(spec.type, '')
    return f'must be of type {spec.type.name}{hint}; {detail}'


def parameter_value(node: Node, name: str) -> Any:
    """The value of ``node``'s parameter ``name``; ``None`` if it is declared
    without a value."""
    try:
        return node.get_parameter(name).value
    except ParameterUninitializedException:
        return None


#: Why ``module_name`` is empty, and every way to set it.
_MODULE_NAME_MISSING = (
    'is empty on node {node} and neither ' + ' nor '.join(MODULE_NAME_ENVS) + ' is set: name the '
    'module with the launch argument module_name:=<name>, with '
    '`ros2 run <package> <executable> --ros-args -p module_name:=<name>`, or with '
    + MODULE_NAME_ENVS[0] + "=<name> in the environment; a node hosting the server can give a "
    "default in code: host_ipc_server(node, module_name='<name>')")


def _module_name_from_environment(environ: Mapping[str, str] | None) -> str:
    """The first of :data:`~vyra_base_ipc.address.MODULE_NAME_ENVS` set and not empty, else ``''``."""
    env = os.environ if environ is None else environ
    return next((env[name] for name in MODULE_NAME_ENVS if env.get(name)), '')


def read_ipc_config(node: Node, environ: Mapping[str, str] | None = None) -> IPCServerConfig:
    """Read and check the IPC server parameters of ``node`` (declared before).

    Does not touch the filesystem or import anything; :meth:`IPCServerHost.start`
    does that.

    :param environ: environment for the fallbacks of empty ``module_name`` and
        ``socket_path`` (default: ``os.environ``).
    :raises ParameterError: the first unusable parameter, with the reason.
    """
    env = os.environ if environ is None else environ
    values = {spec.name: parameter_value(node, spec.name) for spec in PARAMETERS}

    module_name = values['module_name']
    if not isinstance(module_name, str):
        raise ParameterError('module_name', f'must be a string, not {module_name!r}')
    if not module_name:
        # A node that declared module_name itself, empty: the environment still counts.
        module_name = _module_name_from_environment(env)
        if not module_name:
            raise ParameterError('module_name',
                                 _MODULE_NAME_MISSING.format(node=node.get_fully_qualified_name()))
    try:
        validate_module_name(module_name)
    except ValueError as error:
        origin = next((f' (from {name} in the environment)' for name in MODULE_NAME_ENVS
                       if env.get(name) == module_name), '')
        raise ParameterError('module_name', f'{error}{origin}') from None

    socket_path = values['socket_path']
    if not isinstance(socket_path, str):
        raise ParameterError('socket_path', f'must be a string, not {socket_path!r}')
    _refuse_tilde('socket_path', socket_path)
    try:
        if socket_path:
            resolved = validate_socket_path(socket_path)
        else:
            resolved = resolve_socket_path(None, module_name=module_name, environ=env)
    except (TypeError, ValueError) as error:
        raise ParameterError('socket_path', str(error)) from None

    ttrpc_enabled, ttrpc_path = values['ttrpc_enabled'], values['ttrpc_socket_path']
    if not isinstance(ttrpc_enabled, bool):
        raise ParameterError('ttrpc_enabled', f'must be true or false, not {ttrpc_enabled!r}')
    if not isinstance(ttrpc_path, str):
        raise ParameterError('ttrpc_socket_path', f'must be a string, not {ttrpc_path!r}')
    _refuse_tilde('ttrpc_socket_path', ttrpc_path)
    # A path given is checked with the fast lane off too: a bad value would wait
    # for someone to switch it on. The default one (which may be too long for a
    # long socket_path) only counts with the lane on.
    ttrpc_socket_path: Path | None = None
    if ttrpc_enabled or ttrpc_path:
        try:
            ttrpc_socket_path = (validate_socket_path(ttrpc_path) if ttrpc_path
                                 else default_ttrpc_socket_path(resolved))
        except (TypeError, ValueError) as error:
            raise ParameterError('ttrpc_socket_path', str(error)) from None
        if ttrpc_socket_path == resolved:
            raise ParameterError('ttrpc_socket_path', f'must differ from socket_path ({resolved})')
    if not ttrpc_enabled:
        ttrpc_socket_path = None

    listed = values['servicers']
    if listed is None:
        # `servicers: []` in a params file: an empty YAML list has no element
        # type, so rcl gives the parameter no value at all. It means none.
        listed = []
    if not isinstance(listed, (list, tuple)) or not all(isinstance(spec, str) for spec in listed):
        raise ParameterError('servicers', "must be a STRING_ARRAY such as ['package.module:ClassName'], "
                                          f'not {listed!r}')
    servicers = tuple(listed)
    for spec in servicers:
        if not _SERVICER_SPEC.match(spec):
            raise ParameterError('servicers', f'{spec!r} is not of the form package.module:ClassName')

    grace_period = values['grace_period']
    if not isinstance(grace_period, float) or not 0 <= grace_period <= MAX_SECONDS:
        raise ParameterError('grace_period', f'must be a finite number of seconds >= 0 and at most '
                                             f'{MAX_SECONDS:g}, not {grace_period!r}')

    try:
        max_message_bytes = validate_max_message_bytes(values['max_message_bytes'])
    except (TypeError, ValueError) as error:
        raise ParameterError('max_message_bytes', str(error)) from None

    shared_enabled, threshold = values['shared_memory_enabled'], values['shared_memory_threshold']
    if not isinstance(shared_enabled, bool):
        raise ParameterError('shared_memory_enabled', f'must be true or false, not {shared_enabled!r}')
    try:  # checked with shared memory off too, as ttrpc_socket_path
        shared_memory: SharedMemoryOptions | None = SharedMemoryOptions(threshold=threshold)
    except (TypeError, ValueError) as error:
        raise ParameterError('shared_memory_threshold', str(error)) from None
    if not shared_enabled or ttrpc_socket_path is None:
        shared_memory = None

    busy_poll_us = values['busy_poll_us']
    if isinstance(busy_poll_us, bool) or not isinstance(busy_poll_us, int) or \
            not 0 <= busy_poll_us <= 10_000:
        raise ParameterError('busy_poll_us', f'must be an integer from 0 to 10000, not {busy_poll_us!r}')

    keep_freed_memory_mb = values['keep_freed_memory_mb']
    if isinstance(keep_freed_memory_mb, bool) or not isinstance(keep_freed_memory_mb, int) or \
            not 0 <= keep_freed_memory_mb <= 2047:
        raise ParameterError('keep_freed_memory_mb',
                             f'must be an integer from 0 to 2047 (0: off), not {keep_freed_memory_mb!r}')

    maximum_concurrent_rpcs = values['maximum_concurrent_rpcs']
    if isinstance(maximum_concurrent_rpcs, bool) or not isinstance(maximum_concurrent_rpcs, int) or \
            not 0 <= maximum_concurrent_rpcs <= 2**31 - 1:
        raise ParameterError('maximum_concurrent_rpcs', 'must be an integer from 0 (no limit) to 2147483647, '
                                                        f'not {maximum_concurrent_rpcs!r}')

    diagnostics_period = values['diagnostics_period']
    # (A shorter period has an idle node publish /diagnostics on a core of its own.)
    if not isinstance(diagnostics_period, float) or \
            not (diagnostics_period == 0 or 0.01 <= diagnostics_period <= 3600):
        raise ParameterError('diagnostics_period', 'must be 0 (none) or a number of seconds from 0.01 '
                                                   f'to 3600, not {diagnostics_period!r}')

    return IPCServerConfig(module_name=module_name, socket_path=resolved,
                           ttrpc_socket_path=ttrpc_socket_path, servicers=servicers,
                           grace_period=grace_period, max_message_bytes=max_message_bytes,
                           shared_memory=shared_memory, busy_poll=busy_poll_us / 1e6,
                           diagnostics_period=diagnostics_period,
                           keep_freed_memory=keep_freed_memory_mb << 20,
                           maximum_concurrent_rpcs=maximum_concurrent_rpcs or None)


def _refuse_tilde(name: str, path: str) -> None:
    """Refuse a socket path parameter that begins with ``~``.

    ROS passes parameters on unexpanded (``-p socket_path:=~/arm.sock`` in a
    launch file, ``socket_path: ~/arm.sock`` in a parameter file): as a
    relative path it named a directory called ``~`` in the node's working
    directory, made there, and the socket in it.

    :raises ParameterError: it does, with the path meant.
    """
    if path.startswith('~'):
        raise ParameterError(name, f'{path!r} begins with "~", which ROS does not expand (it would name a '
                                   f'directory "~" in {os.getcwd()}): give the whole path, such as '
                                   f'{os.path.expanduser(path)!r}')


def load_servicer(spec: str) -> Any:
    """Import ``package.module:ClassName`` and return ``ClassName()``.

    :raises ParameterError: (parameter ``servicers``) the module cannot be
        imported, has no such attribute, it is a class that is no servicer
        (said before it is created), or creating the instance fails.
    """
    if not _SERVICER_SPEC.match(spec):
        raise ParameterError('servicers', f'{spec!r} is not of the form package.module:ClassName')
    module_name, _, class_name = spec.partition(':')
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module failing at import time
        raise ParameterError('servicers', f'cannot import {module_name!r} for {spec!r}: {error}') from None
    factory = getattr(module, class_name, None)
    if factory is None:
        raise ParameterError('servicers', f'module {module_name!r} has no attribute {class_name!r}')
    if not callable(factory):
        raise ParameterError('servicers', f'{spec!r} is not a class')
    if isinstance(factory, type):
        # Checked before the class is created: another class (a node, a
        # message) would run its constructor in this process for nothing, and
        # a node hosting an IPC server would host one for each of these specs.
        try:
            find_add_function(factory)
        except TypeError:
            raise ParameterError('servicers', f'{spec!r} is not a servicer: {class_name} derives from no '
                                              'grpcio-generated *Servicer class; name the class that '
                                              'implements your service (class X(<Service>Servicer))'
                                 ) from None
    try:
        return factory()
    except Exception as error:
        raise ParameterError('servicers', f'{spec}() failed: {error!r}') from None
