"""The default ``vyra.ipc.ModuleService``: use it as is, or subclass it.

- ``ExecuteCommand`` looks the command up in a registry. Built in: ``ping``
  (result ``pong``) and ``status`` (a JSON object). Add commands with the
  :func:`command` decorator on methods of a subclass, or with
  :meth:`ModuleService.register_command`. ``status_code`` is a
  ``google.rpc.Code`` number: 0 OK, 3 INVALID_ARGUMENT (the command raised
  ``ValueError``, or read a parameter the request does not have), 5
  NOT_FOUND (unknown command), 13 INTERNAL (it raised anything else), or
  what a :class:`CommandError` says (a ``grpc.StatusCode`` other than OK,
  or its number; a handler that gives it anything else answers INTERNAL).
- ``Initialize`` loads the YAML or JSON file at ``config_path`` into
  :attr:`ModuleService.config` and reports failures in ``InitResponse``. It
  reads only module configuration: a regular file of at most
  ``max_config_bytes`` inside one of ``config_dirs`` (by default the
  module's installed ``share/<module_name>/config``), so a caller cannot
  make the server read other files for it, or hang it on a FIFO or device.
  ``GetData('config')`` sends the configuration as JSON, so a configuration
  JSON cannot carry (a YAML date or timestamp, ``!!binary``, ``!!set``, keys
  that are one as JSON text, such as ``1`` and ``'1'``, or to Python, such as
  ``1`` and ``true``) is refused, naming
  where it is and what; keys of numbers, true/false or null become their
  JSON text (``{1: a, b: c}`` is ``{"1": "a", "b": "c"}``).
- ``GetData`` returns a registered data item (built in: ``status``,
  ``config``); an unknown key is the RPC status NOT_FOUND, and a provider
  that returned what JSON cannot carry (a bug of the server's) INTERNAL,
  naming the item, where in its value and what.

Command handlers take the request's ``parameters`` (a ``dict[str, str]``)
and return the result string; data providers take nothing and return the
item. ``async def`` handlers and providers run on the server's event loop;
plain ``def`` ones run in a worker thread so that a slow command or data
item never stalls other calls.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
import contextvars
import functools
import inspect
import json
import logging
import os
from pathlib import Path
import stat
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar, Union

import grpc
import yaml

from . import module_service_pb2 as pb
from . import module_service_pb2_grpc as pb_grpc
from ._deadline import within
from ._json_text import NotJSON, json_text
from ._log_limit import log_limited
from ._request_guard import HANDLER_FAILURES
from .address import StrPath, validate_module_name
from .exceptions import CommandError

# CommandError is defined in .exceptions, importable from here too.
__all__ = ['CommandError', 'ModuleService', 'command']

CommandResult = Union[str, Awaitable[str]]
CommandHandler = Callable[[dict[str, str]], CommandResult]
DataItem = Union[bytes, str, Mapping[str, Any], list[Any]]
DataProvider = Callable[[], Union[DataItem, Awaitable[DataItem]]]
_F = TypeVar('_F', bound=Callable[..., Any])

_logger = logging.getLogger(__name__)

_COMMAND_ATTRIBUTE = '_vyra_ipc_command'
#: The largest configuration file Initialize reads, by default.
DEFAULT_MAX_CONFIG_BYTES = 1024 * 1024
#: Seconds Initialize waits for a file to be read.
_READ_TIMEOUT = 5.0


def command(name: str | None = None) -> Callable[[_F], _F]:
    """Mark a method of a :class:`ModuleService` subclass as the handler of
    command ``name`` (default: the method's name)."""
    def mark(method: _F) -> _F:
        setattr(method, _COMMAND_ATTRIBUTE, name or method.__name__)
        return method
    return mark


def _status_code(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class ModuleService(pb_grpc.ModuleServiceServicer):
    """Default implementation of ``vyra.ipc.ModuleService``.

    Handlers are coroutines and run on the server's event loop; ``def``
    commands and data providers run in the server's threads for ``def``
    handlers (its ``max_workers``, counted in its diagnostics, never joined
    at exit), or with :func:`asyncio.to_thread` outside an
    :class:`~vyra_base_ipc.IPCServer`. One servicer may be served by several
    servers at once: it uses the threads of the last started of those still
    serving, and a server that stops leaves it serving on the others.

    :param module_name: reported by ``status``. ``None``: ``'module'``, until
        a hosting node attaches it (:meth:`attach_ipc_host`; the ``servicers``
        parameter makes its classes without arguments): then the node's.
    :param config_dirs: the directories ``Initialize`` may read from (a
        file's real path, symlinks resolved, must lie inside one); ``None``:
        the module's ``share/<module_name>/config`` where the ament index
        knows the package, else none (Initialize then says how to allow one).
    :param max_config_bytes: the largest file ``Initialize`` reads.
    :raises TypeError, ValueError: ``module_name`` is not a module name (a str matching
        ``^[a-z][a-z0-9_]*$``).
    :raises ValueError: ``max_config_bytes`` is not an int >= 1.
    """

    def __init__(self, module_name: str | None = None, *, config_dirs: Iterable[StrPath] | None = None,
                 max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> None:
        self.module_name = validate_module_name('module' if module_name is None else module_name)
        #: What a hosting node may still set: the module name and the default config_dirs.
        self._unnamed, self._default_dirs = module_name is None, config_dirs is None
        self.config_dirs = _real_paths(
            _default_config_dirs(self.module_name) if config_dirs is None
            else ([config_dirs] if isinstance(config_dirs, (str, os.PathLike)) else config_dirs))
        if isinstance(max_config_bytes, bool) or not isinstance(max_config_bytes, int) \
                or max_config_bytes < 1:
            raise ValueError(f'max_config_bytes must be an int >= 1, not {max_config_bytes!r}')
        self.max_config_bytes = max_config_bytes
        self.config: dict[str, Any] = {}
        self.config_path: Path | None = None
        self._started = time.monotonic()
        # Given by the IPCServers serving it, the last started last.
        self._handler_threads: list[Executor] = []
        self._commands: dict[str, CommandHandler] = {}
        self._data: dict[str, DataProvider] = {
            'status': self._status_item,  # (async: on the loop, never waiting for a thread)
            'config': self._config_item,
        }
        for cls in reversed(type(self).__mro__):
            for attribute, value in vars(cls).items():
                name = getattr(value, _COMMAND_ATTRIBUTE, None)
                if name is not None:
                    self._commands[name] = getattr(self, attribute)

    def attach_ipc_host(self, host: Any) -> None:
        """Called by :class:`~vyra_base_ipc.node.IPCServerHost` before it serves:
        a service made without a module name takes the host's, with (unless
        ``config_dirs`` were given) that module's configuration directory."""
        if self._unnamed:
            self.module_name, self._unnamed = host.config.module_name, False
            if self._default_dirs:
                self.config_dirs = _real_paths(_default_config_dirs(self.module_name))

    def use_handler_threads(self, executor: Executor) -> None:
        """Run ``def`` commands and data providers in ``executor`` (an
        :class:`~vyra_base_ipc.IPCServer` serving this servicer gives its own
        as it starts, and takes it back with :meth:`stop_using_handler_threads`
        as it stops). Given several (one servicer served by several servers),
        the last one given that was not taken back is used."""
        self._handler_threads.append(executor)

    def stop_using_handler_threads(self, executor: Executor) -> None:
        """Take back ``executor`` (given by :meth:`use_handler_threads`; one
        not given is ignored): another one given is used, or without one
        :func:`asyncio.to_thread`. A server that stops shuts its threads down,
        and the servicer may still serve on another server."""
        if executor in self._handler_threads:
            self._handler_threads.remove(executor)

    # -- registries -----------------------------------------------------------------

    @property
    def commands(self) -> tuple[str, ...]:
        """The names of the registered commands, sorted."""
        return tuple(sorted(self._commands))

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """Add or replace the handler of command ``name``.

        :raises ValueError: ``name`` is not a non-empty str.
        :raises TypeError: ``handler`` is not callable.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f'command name must be a non-empty str, not {name!r}')
        if not callable(handler):
            raise TypeError(f'handler of command {name!r} must be callable')
        self._commands[name] = handler

    def register_data(self, key: str, provider: DataProvider) -> None:
        """Add or replace the provider of data item ``key`` for ``GetData``.

        An ``async def`` provider runs on the server's event loop, a ``def``
        one in a worker thread, as commands do. It returns bytes (sent as
        is), text (UTF-8), or a mapping or list (sent as JSON, objects sorted
        by key; keys of numbers, true/false or null as their JSON text). A value JSON cannot carry (a
        date, bytes or a set inside, a key of another type, a cycle) is
        answered INTERNAL, naming the item, where in the value and what.

        :raises ValueError: ``key`` is not a non-empty str.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f'data key must be a non-empty str, not {key!r}')
        self._data[key] = provider

    # -- built-in commands ----------------------------------------------------------

    @command('ping')
    async def ping(self, parameters: dict[str, str]) -> str:
        """Command ``ping``: answers ``pong``."""
        return 'pong'

    @command('status')
    async def status(self, parameters: dict[str, str]) -> str:
        """Command ``status``: the module name, uptime in seconds, whether a
        configuration was loaded, and the commands, as a JSON object."""
        return json.dumps(self._status_object(), sort_keys=True)

    async def on_initialize(self, config: dict[str, Any]) -> None:
        """Called after ``Initialize`` loaded a configuration; override to apply
        it, with an ``async def`` (run on the event loop) or a ``def`` (run in a
        worker thread, as commands are). Raising reports failure in
        ``InitResponse`` (the old config stays)."""

    # -- RPC handlers ---------------------------------------------------------------

    async def Initialize(self, request: pb.InitRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.InitResponse:
        """Load the YAML or JSON file at ``config_path`` into :attr:`config`
        and call :meth:`on_initialize`; a failure is reported in the response
        and keeps the old configuration. A configuration JSON cannot carry
        (``GetData('config')`` sends it as JSON) is a failure that names where
        in it and what: ``arm.calibrated is a datetime.date (2024-01-01)``."""
        try:
            # Checked without blocking (no FIFO or device is ever opened for
            # reading), then read in a thread that cannot hold the call up.
            path, file = _open_config(request.config_path, self.config_dirs, self.max_config_bytes)
            try:
                text = await within(asyncio.to_thread(_read_config, file, path, self.max_config_bytes),
                                    _READ_TIMEOUT)
            except TimeoutError:
                raise ValueError(f'config file {str(path)!r} could not be read within '
                                 f'{_READ_TIMEOUT:g} s') from None
            config = _parse_config(path, text)
            await _run(self._threads(), self.on_initialize, config)  # (a def one too, as commands)
        except (OSError, ValueError) as error:
            return pb.InitResponse(success=False, message=str(error))
        except HANDLER_FAILURES as error:  # a user hook must not crash the call
            return pb.InitResponse(success=False, message=f'on_initialize failed: {error!r}')
        self.config, self.config_path = config, path
        return pb.InitResponse(success=True, message=f'loaded {len(config)} keys from {path}')

    async def ExecuteCommand(self, request: pb.CommandRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.CommandResponse:
        """Run the handler of ``command`` with ``parameters``; its outcome is
        in ``status_code`` (see the module docstring), never an RPC error."""
        handler = self._commands.get(request.command)
        if handler is None:
            return pb.CommandResponse(
                status_code=_status_code(grpc.StatusCode.NOT_FOUND),
                result=f'unknown command {_shown(request.command)}; available: {", ".join(self.commands)}')
        try:
            result = await _run(self._threads(), handler, _Parameters(request.parameters))
        except MissingParameter as error:
            return pb.CommandResponse(status_code=_status_code(grpc.StatusCode.INVALID_ARGUMENT),
                                      result=f'{request.command}: {error.args[0]}')
        except CommandError as error:
            return pb.CommandResponse(status_code=_status_code(error.code), result=str(error))
        except ValueError as error:
            return pb.CommandResponse(status_code=_status_code(grpc.StatusCode.INVALID_ARGUMENT),
                                      result=f'{request.command}: {error}')
        except HANDLER_FAILURES as error:  # (an exit would end the server's loop)
            return pb.CommandResponse(status_code=_status_code(grpc.StatusCode.INTERNAL),
                                      result=f'{request.command} failed: {error!r}')
        return pb.CommandResponse(status_code=0, result=str(result))

    async def GetData(self, request: pb.DataRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.DataResponse:
        """Return the data item ``key`` (see :meth:`register_data`).

        :raises grpc.aio.AbortError: (status NOT_FOUND) for an unknown key;
            (INTERNAL) for a value JSON cannot carry.
        """
        provider = self._data.get(request.key)
        if provider is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f'no data item {_shown(request.key)}; available: {", ".join(sorted(self._data))}')
        value = await _run(self._threads(), provider)
        if isinstance(value, bytes):
            return pb.DataResponse(key=request.key, result=value, content_type='application/octet-stream')
        if isinstance(value, str):
            return pb.DataResponse(key=request.key, result=value.encode(), content_type='text/plain')
        try:
            text = json_text(value)
        except NotJSON as error:  # the server's bug: its log says so too
            message = (f'the provider of data item {_shown(request.key)} returned what JSON cannot carry: '
                       f'{error}')
            # One kind, not one a key: a caller chooses the key, and one kind a key filled the limit's
            # table (276 keys: every other kind then shared one limit). The message names the key.
            log_limited(_logger, logging.ERROR, 'GetData', 'GetData: %s', message)
            await context.abort(grpc.StatusCode.INTERNAL, message)
        return pb.DataResponse(key=request.key, result=text.encode(), content_type='application/json')

    def _threads(self) -> Executor | None:
        threads = self._handler_threads
        return threads[-1] if threads else None

    async def _status_item(self) -> dict[str, Any]:
        return self._status_object()

    async def _config_item(self) -> dict[str, Any]:
        return self.config

    def _status_object(self) -> dict[str, Any]:
        return {
            'module': self.module_name,
            'uptime_seconds': round(time.monotonic() - self._started, 3),
            'initialized': self.config_path is not None,
            'commands': list(self.commands),
        }


class MissingParameter(KeyError):
    """A command read a parameter the request does not have (INVALID_ARGUMENT)."""


class _Parameters(dict[str, str]):
    """A command's parameters: reading one the request lacks raises
    :class:`MissingParameter`, naming it and those given."""

    def __missing__(self, key: str) -> str:
        names = sorted(self)
        given = ', '.join(names[:_NAMES_SHOWN]) + (f' and {len(names) - _NAMES_SHOWN} more'
                                                   if len(names) > _NAMES_SHOWN else '')
        raise MissingParameter(f'missing parameter {key!r} (given: {_cut(given) or "none"})')


#: Characters of a caller's string an answer quotes at most, and names it lists:
#: a request may carry megabytes of them, and its answer must not.
_CHARACTERS_SHOWN = 120
_NAMES_SHOWN = 20


def _cut(text: str) -> str:
    """``text``, cut to :data:`_CHARACTERS_SHOWN` characters with a note of its length."""
    if len(text) <= _CHARACTERS_SHOWN:
        return text
    return f'{text[:_CHARACTERS_SHOWN]}… ({len(text)} characters)'


def _shown(text: str) -> str:
    """A caller's string quoted for an answer, cut as :func:`_cut` does."""
    if len(text) <= _CHARACTERS_SHOWN:
        return repr(text)
    return f'{text[:_CHARACTERS_SHOWN]!r}… ({len(text)} characters)'


async def _run(threads: Executor | None, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``: awaited on the event loop if it is a coroutine
    function, else run in ``threads`` (:func:`asyncio.to_thread` without);
    an awaitable it returns is awaited."""
    if inspect.iscoroutinefunction(function):
        return await function(*args)
    if threads is None:
        result = await asyncio.to_thread(function, *args)
    else:  # (with the caller's context variables, as to_thread() passes them)
        call = functools.partial(contextvars.copy_context().run, function, *args)
        result = await asyncio.get_running_loop().run_in_executor(threads, call)
    if inspect.isawaitable(result):
        result = await result
    return result


def _real_paths(directories: Iterable[StrPath]) -> tuple[Path, ...]:
    """``directories`` with their symlinks resolved, as Initialize compares them."""
    return tuple(Path(os.path.realpath(directory)) for directory in directories)


def _default_config_dirs(module_name: str) -> list[Path]:
    """``share/<module_name>/config`` of the installed package, if any."""
    try:
        from ament_index_python.packages import get_package_share_directory
        return [Path(get_package_share_directory(module_name)) / 'config']
    except (ImportError, LookupError, OSError, ValueError):
        return []


def _open_config(config_path: str, allowed: tuple[Path, ...], limit: int) -> tuple[Path, int]:
    """Check ``config_path`` against the rules and open it; the path and the
    open descriptor (the caller closes it by reading it).

    :raises ValueError: a rule refuses it (the message names the rule).
    """
    if not config_path.strip():
        raise ValueError('config_path is empty')
    if len(config_path) > os.pathconf('/', 'PC_PATH_MAX'):
        raise ValueError(f'config_path {_shown(config_path)} is longer than any path may be')
    path = Path(config_path)
    if not path.is_absolute():
        raise ValueError(f'config_path {config_path!r} is relative; give an absolute path')
    if not allowed:
        raise ValueError(f'config_path {config_path!r} refused: no configuration directory is allowed '
                         '(ModuleService(config_dirs=[...]), or install the module so that its '
                         'share/<module>/config exists)')
    real = Path(os.path.realpath(path))
    if not any(real == directory or directory in real.parents for directory in allowed):
        where = ', '.join(str(directory) for directory in allowed)
        resolved = f' (resolves to {str(real)!r})' if real != path else ''
        raise ValueError(f'config_path {config_path!r}{resolved} refused: it is not inside an allowed '
                         f'configuration directory ({where})')
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f'config file {config_path!r} does not exist') from None
    except PermissionError:
        raise ValueError(f'config file {config_path!r} is not readable (permission denied)') from None
    except OSError as error:
        raise ValueError(f'config file {config_path!r} cannot be opened: {error.strerror}') from None
    info = os.fstat(fd)
    problem = (None if stat.S_ISREG(info.st_mode) else
               'is a directory, not a file' if stat.S_ISDIR(info.st_mode) else
               'is not a regular file (a FIFO, socket or device)')
    if problem is None and info.st_size > limit:
        problem = f'has {info.st_size} bytes, more than the {limit} allowed (max_config_bytes)'
    if problem is not None:
        os.close(fd)
        raise ValueError(f'config_path {config_path!r} refused: it {problem}')
    return real, fd


def _read_config(fd: int, path: Path, limit: int) -> str:
    """Read at most ``limit`` bytes of the open file, as UTF-8; closes it."""
    with os.fdopen(fd, 'rb') as file:
        data = file.read(limit + 1)  # a file that grew since fstat still stops here
    if len(data) > limit:
        raise ValueError(f'config_path {str(path)!r} refused: it has more than the {limit} bytes '
                         'allowed (max_config_bytes)')
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as error:
        raise ValueError(f'config file {str(path)!r} is not UTF-8 text: {error}') from None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing two keys of one mapping that a dict takes
    for one (``1`` and ``true``, ``0`` and ``false``, ``1`` and ``1.0``):
    keys of their own in YAML and as JSON text, of which the dict kept the
    first key with the last value, the other lost without a word. A key
    written twice stays YAML's duplicate, the last value taken."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        seen: dict[Any, tuple[Any, yaml.Node]] = {}
        for key_node, _ in node.value:  # (constructed above: the same objects again)
            key = self.construct_object(key_node, deep=deep)
            first, first_node = seen.setdefault(key, (key, key_node))
            if type(first) is not type(key):
                raise _KeysAsOne(f'the keys {first_node.value} and {key_node.value} (line '
                                 f'{key_node.start_mark.line + 1}), which Python takes for one: quote them '
                                 'to keep both, as text')
        return mapping


class _KeysAsOne(ValueError):
    """Two keys of a configuration's mapping that Python takes for one."""


def _parse_config(path: Path, text: str) -> dict[str, Any]:
    """The YAML or JSON mapping in ``text``.

    :raises ValueError: not valid, not a mapping, or not what JSON can carry
        (naming the path, and where in the mapping).
    """
    try:
        # (_ConfigLoader is yaml.safe_load's SafeLoader, with one more check)
        config = json.loads(text) if path.suffix == '.json' else yaml.load(text, _ConfigLoader)
    except _KeysAsOne as error:
        raise ValueError(f'config file {str(path)!r} has {error}') from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = 'JSON' if path.suffix == '.json' else 'YAML'
        raise ValueError(f'config file {str(path)!r} is not valid {kind}: {error}') from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(
            f'config file {str(path)!r} must hold a mapping at the top level, not {type(config).__name__}')
    try:
        json_text(config, 'the top level')
    except NotJSON as error:
        hint = '; quote a YAML date or time to keep it as text' if error.is_time else ''
        raise ValueError(f"config file {str(path)!r} cannot be sent as JSON, as GetData('config') sends it: "
                         f'{error}{hint}') from None
    return config
