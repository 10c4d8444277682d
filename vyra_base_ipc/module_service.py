"""The default ``vyra.ipc.ModuleService``: use it as is, or subclass it.

- ``ExecuteCommand`` looks the command up in a registry. Built in: ``ping``
  (result ``pong``) and ``status`` (a JSON object). Add commands with the
  :func:`command` decorator on methods of a subclass, or with
  :meth:`ModuleService.register_command`. ``status_code`` is a
  ``google.rpc.Code`` number: 0 OK, 3 INVALID_ARGUMENT (the command raised
  ``ValueError``), 5 NOT_FOUND (unknown command), 13 INTERNAL (it raised
  anything else), or what a :class:`CommandError` says.
- ``Initialize`` loads the YAML or JSON file at ``config_path`` into
  :attr:`ModuleService.config` and reports failures in ``InitResponse``.
- ``GetData`` returns a registered data item (built in: ``status``,
  ``config``); an unknown key is the RPC status NOT_FOUND.

Command handlers take the request's ``parameters`` (a ``dict[str, str]``)
and return the result string. ``async def`` handlers run on the server's
event loop; plain ``def`` handlers run in a worker thread so that a slow
command never stalls other calls.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
import time
from typing import Any, Awaitable, Callable, Mapping, TypeVar, Union

import grpc
import yaml

from . import module_service_pb2 as pb
from . import module_service_pb2_grpc as pb_grpc
from .address import validate_module_name
from .exceptions import CommandError

# CommandError is defined in .exceptions, importable from here too.
__all__ = ['CommandError', 'ModuleService', 'command']

CommandResult = Union[str, Awaitable[str]]
CommandHandler = Callable[[dict[str, str]], CommandResult]
DataItem = Union[bytes, str, Mapping[str, Any], list]
DataProvider = Callable[[], Union[DataItem, Awaitable[DataItem]]]
_F = TypeVar('_F', bound=Callable[..., Any])

_COMMAND_ATTRIBUTE = '_vyra_ipc_command'


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

    Handlers are coroutines and run on the server's event loop.

    :param module_name: reported by ``status``.
    """

    def __init__(self, module_name: str = 'module') -> None:
        self.module_name = validate_module_name(module_name)
        self.config: dict[str, Any] = {}
        self.config_path: Path | None = None
        self._started = time.monotonic()
        self._commands: dict[str, CommandHandler] = {}
        self._data: dict[str, DataProvider] = {
            'status': self._status_object,
            'config': lambda: self.config,
        }
        for cls in reversed(type(self).__mro__):
            for attribute, value in vars(cls).items():
                name = getattr(value, _COMMAND_ATTRIBUTE, None)
                if name is not None:
                    self._commands[name] = getattr(self, attribute)

    # -- registries -----------------------------------------------------------------

    @property
    def commands(self) -> tuple[str, ...]:
        """The names of the registered commands, sorted."""
        return tuple(sorted(self._commands))

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """Add or replace the handler of command ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f'command name must be a non-empty str, not {name!r}')
        if not callable(handler):
            raise TypeError(f'handler of command {name!r} must be callable')
        self._commands[name] = handler

    def register_data(self, key: str, provider: DataProvider) -> None:
        """Add or replace the provider of data item ``key`` for ``GetData``.

        The provider returns bytes (sent as is), text (UTF-8), or a
        JSON-serializable mapping or list (sent as JSON).
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
        it. Raising reports failure in ``InitResponse`` (the old config stays)."""

    # -- RPC handlers ---------------------------------------------------------------

    async def Initialize(self, request: pb.InitRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.InitResponse:
        """Load the YAML or JSON file at ``config_path`` into :attr:`config`
        and call :meth:`on_initialize`; a failure is reported in the response
        and keeps the old configuration."""
        try:
            path, config = await asyncio.to_thread(_load_config, request.config_path)
            await self.on_initialize(config)
        except (OSError, ValueError) as error:
            return pb.InitResponse(success=False, message=str(error))
        except Exception as error:  # a user hook failing must not crash the call
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
                result=f'unknown command {request.command!r}; available: {", ".join(self.commands)}')
        try:
            result = await _run(handler, dict(request.parameters))
        except CommandError as error:
            return pb.CommandResponse(status_code=_status_code(error.code), result=str(error))
        except ValueError as error:
            return pb.CommandResponse(status_code=_status_code(grpc.StatusCode.INVALID_ARGUMENT),
                                      result=f'{request.command}: {error}')
        except Exception as error:
            return pb.CommandResponse(status_code=_status_code(grpc.StatusCode.INTERNAL),
                                      result=f'{request.command} failed: {error!r}')
        return pb.CommandResponse(status_code=0, result=str(result))

    async def GetData(self, request: pb.DataRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.DataResponse:
        """Return the data item ``key`` (see :meth:`register_data`).

        :raises grpc.aio.AbortError: (status NOT_FOUND) for an unknown key.
        """
        provider = self._data.get(request.key)
        if provider is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f'no data item {request.key!r}; available: {", ".join(sorted(self._data))}')
        value = provider()
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, bytes):
            return pb.DataResponse(key=request.key, result=value, content_type='application/octet-stream')
        if isinstance(value, str):
            return pb.DataResponse(key=request.key, result=value.encode(), content_type='text/plain')
        return pb.DataResponse(key=request.key, result=json.dumps(value, sort_keys=True).encode(),
                               content_type='application/json')

    def _status_object(self) -> dict[str, Any]:
        return {
            'module': self.module_name,
            'uptime_seconds': round(time.monotonic() - self._started, 3),
            'initialized': self.config_path is not None,
            'commands': list(self.commands),
        }


async def _run(handler: CommandHandler, parameters: dict[str, str]) -> str:
    if inspect.iscoroutinefunction(handler):
        return await handler(parameters)
    result = await asyncio.to_thread(handler, parameters)
    if inspect.isawaitable(result):
        result = await result
    return result


def _load_config(config_path: str) -> tuple[Path, dict[str, Any]]:
    """Read a YAML or JSON mapping. Raises OSError/ValueError with the path in the message."""
    if not config_path.strip():
        raise ValueError('config_path is empty')
    path = Path(config_path)
    if not path.is_absolute():
        raise ValueError(f'config_path {config_path!r} is relative; give an absolute path')
    if path.is_dir():
        raise ValueError(f'config_path {config_path!r} is a directory, not a file')
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise ValueError(f'config file {config_path!r} does not exist') from None
    except PermissionError:
        raise ValueError(f'config file {config_path!r} is not readable (permission denied)') from None
    except UnicodeDecodeError as error:
        raise ValueError(f'config file {config_path!r} is not UTF-8 text: {error}') from None
    try:
        config = json.loads(text) if path.suffix == '.json' else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = 'JSON' if path.suffix == '.json' else 'YAML'
        raise ValueError(f'config file {config_path!r} is not valid {kind}: {error}') from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(
            f'config file {config_path!r} must hold a mapping at the top level, not {type(config).__name__}')
    return path, config
