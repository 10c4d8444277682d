"""Method tables learned from grpcio-generated code.

The generated ``*Stub`` classes and ``add_*Servicer_to_server`` functions are
run once against recording objects instead of a real channel or server. That
yields, for every method, its full path, its streaming kind and its
(de)serializers, without parsing ``.proto`` files and without any change to
user code. Both lanes and both clients work from these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
import enum
import functools
import importlib
from types import ModuleType
from typing import Any, Callable, Mapping

import grpc

__all__ = [
    'CheckedSerializer',
    'Method',
    'MethodKind',
    'ServiceRegistration',
    'find_add_function',
    'record_servicer',
    'request_type_error',
    'stream_returned',
    'stub_methods',
]


class MethodKind(enum.Enum):
    """The four gRPC call shapes."""

    UNARY_UNARY = 'unary_unary'
    UNARY_STREAM = 'unary_stream'
    STREAM_UNARY = 'stream_unary'
    STREAM_STREAM = 'stream_stream'

    def __init__(self, value: str) -> None:
        # Plain attributes, not properties: every call reads them several
        # times, and a property of an enum member costs ~0.2 us a read.
        #: Whether the client sends a stream of requests.
        self.request_streaming: bool = value.startswith('stream_')
        #: Whether the server answers with a stream of responses.
        self.response_streaming: bool = value.endswith('_stream')

    @classmethod
    def of(cls, request_streaming: bool, response_streaming: bool) -> 'MethodKind':
        """The kind with these streaming directions."""
        return {
            (False, False): cls.UNARY_UNARY,
            (False, True): cls.UNARY_STREAM,
            (True, False): cls.STREAM_UNARY,
            (True, True): cls.STREAM_STREAM,
        }[(request_streaming, response_streaming)]


@dataclass(frozen=True)
class Method:
    """One RPC method as a client sees it."""

    name: str
    path: str
    kind: MethodKind
    request_serializer: Callable[[Any], bytes] | None
    response_deserializer: Callable[[bytes], Any] | None
    #: Full name of the request message (``"vyra.ipc.DataRequest"``); None
    #: where the stub does not tell.
    request_type: str | None = None


def request_type_error(method: Method, request: Any, index: int | None = None) -> TypeError | None:
    """Why ``request`` cannot go as ``method``'s request (``index``: the
    message's place in a request stream); ``None`` if it can, or where the
    stub does not tell the type. Checked before anything is sent: protobuf
    serializes a message of another type silently (the server then parses
    it as a request with its fields lost), and fails anything else deep
    inside, on the gRPC lane as INTERNAL as if the server had said so."""
    given = getattr(getattr(request, 'DESCRIPTOR', None), 'full_name', None)
    if method.request_type is None or given == method.request_type and not isinstance(request, type):
        return None
    what = (f'the class {request.__qualname__} (make one: {request.__qualname__}())'
            if isinstance(request, type) else given or type(request).__qualname__)
    if index is None:
        return TypeError(f'{method.name} takes a {method.request_type} request, not {what}')
    return TypeError(f'{method.name} takes a stream of {method.request_type} requests, not {what} '
                     f'(message {index} of the stream)')


def _request_type(path: str, response_deserializer: Any) -> str | None:
    """The request message's full name, looked up in the descriptor pool of
    the response class (a generated stub passes ``Response.FromString``,
    bound to it; its request serializer is the base class's)."""
    method = _method_descriptor(path, response_deserializer)
    return None if method is None else str(method.input_type.full_name)


def _method_descriptor(path: str, deserializer: Any) -> Any:
    """The descriptor of the method at ``path``, from the descriptor pool of
    the class ``deserializer`` is bound to (``Message.FromString``); ``None``
    where there is none."""
    descriptor = getattr(getattr(deserializer, '__self__', None), 'DESCRIPTOR', None)
    if descriptor is None:
        return None
    try:
        return descriptor.file.pool.FindMethodByName(path.strip('/').replace('/', '.'))
    except (KeyError, AttributeError):
        return None


def _import_service_file(code: Any) -> None:
    """Import the ``_pb2`` module beside the ``_pb2_grpc`` module that
    defines ``code`` (a stub class, an add function), if there is one: a
    ``_pb2_grpc`` module imports the modules of its messages only, so the
    file declaring a service whose messages all come from other files
    (``google.protobuf.Empty``, another package) is otherwise not in the
    descriptor pool, and its methods' types not known
    (:func:`_method_descriptor`)."""
    module = getattr(code, '__module__', None)
    if isinstance(module, str) and module.endswith('_pb2_grpc'):
        try:
            importlib.import_module(module.removesuffix('_grpc'))
        except ImportError:
            pass  # (a module of another layout: its types stay unknown, as before)


def _checked_answers(path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a response serializer that refuses what is not the
    method's response message (:class:`CheckedSerializer`; ``handler`` as it
    is where its types are not known)."""
    method = _method_descriptor(path, handler.request_deserializer)
    serialize = handler.response_serializer
    if method is None or serialize is None or getattr(serialize, '__name__', None) != 'SerializeToString':
        return handler  # (none, or a serializer of the add function's own: it says what it takes)
    expected = str(method.output_type.full_name)
    checked = CheckedSerializer(path, expected, handler.response_streaming, serialize)
    kind = f'{"stream" if handler.request_streaming else "unary"}_{"stream" if checked.streams else "unary"}'
    factory = getattr(grpc, f'{kind}_rpc_method_handler')
    return factory(getattr(handler, kind), request_deserializer=handler.request_deserializer,
                   response_serializer=checked)


class CheckedSerializer:
    """protobuf's ``SerializeToString`` for the response messages of one
    method, refusing any other: it serializes a message of any class, whose
    bytes the caller would then read as the response (fields silently wrong
    or lost), and of ``None`` says only that a descriptor does not apply.
    The ``TypeError`` raised names the method, what the handler answered and
    what it must answer; both lanes fail the call UNKNOWN with it, as for any
    answer that does not serialize."""

    __slots__ = ('path', 'expected', 'streams', 'serialize')

    def __init__(self, path: str, expected: str, streams: bool, serialize: Callable[[Any], bytes]) -> None:
        self.path = path
        #: The response message's full name.
        self.expected = expected
        self.streams = streams
        #: protobuf's serializer, unchecked.
        self.serialize = serialize

    def check(self, response: Any) -> None:
        """Raise ``TypeError`` unless ``response`` is the method's response message."""
        if getattr(getattr(response, 'DESCRIPTOR', None), 'full_name', None) != self.expected:
            raise TypeError(_wrong_answer(self.path, self.expected, response, self.streams))

    def __call__(self, response: Any) -> bytes:
        self.check(response)
        return self.serialize(response)


def stream_returned(path: str, value: Any) -> TypeError:
    """The error of an ``async def`` response-stream handler that returned
    ``value`` (not ``None``): it is not sent, and the stream would end OK
    with nothing in it, as grpc.aio ends it."""
    return TypeError(f'the handler of {path} returned {_given(value)}: a response-stream handler yields '
                     'its responses (or writes them with context.write()); what it returns is not sent')


def _given(value: Any) -> str:
    return getattr(getattr(value, 'DESCRIPTOR', None), 'full_name', None) or (
        'None' if value is None else f'a {type(value).__qualname__}')


def _wrong_answer(path: str, expected: str, response: Any, streams: bool) -> str:
    given = _given(response)
    what = f'the handler of {path} {"yielded" if streams else "returned"} {given}, not a {expected}'
    if response is None:
        return what + (' (a stream handler yields its responses)' if streams else
                       ' (did it forget to return its response?)')
    return what


class _RecordingChannel:
    """Stands in for a channel while a generated stub's ``__init__`` runs."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def _recorder(self, kind: MethodKind) -> Callable[..., None]:
        def record(path: str, request_serializer: Any = None, response_deserializer: Any = None,
                   **_ignored: Any) -> None:
            name = path.rsplit('/', 1)[-1]
            self.methods[name] = Method(name, path, kind, request_serializer, response_deserializer,
                                        _request_type(path, response_deserializer))
        return record

    def __getattr__(self, attribute: str) -> Callable[..., None]:
        try:
            return self._recorder(MethodKind(attribute))
        except ValueError:
            raise AttributeError(attribute) from None


@functools.lru_cache(maxsize=None)
def stub_methods(stub_class: type[Any]) -> Mapping[str, Method]:
    """Return ``{method name: Method}`` for a generated ``*Stub`` class.

    :raises TypeError: if ``stub_class`` is not a class that builds its methods
        from a channel as grpcio-generated stubs do.
    """
    if not isinstance(stub_class, type):
        raise TypeError(f'service_stub must be a generated *Stub class, not {stub_class!r}')
    _import_service_file(stub_class)
    recorder = _RecordingChannel()
    try:
        stub_class(recorder)
    except Exception as error:
        raise TypeError(
            f'service_stub {stub_class.__qualname__} is not a grpcio-generated stub class: {error}'
        ) from error
    if not recorder.methods:
        raise TypeError(f'service_stub {stub_class.__qualname__} defines no RPC methods')
    return dict(recorder.methods)


@dataclass(frozen=True)
class ServiceRegistration:
    """What an ``add_*Servicer_to_server`` function registers for one servicer."""

    name: str
    handlers: Mapping[str, grpc.RpcMethodHandler]
    add_to_server: Callable[[Any, Any], None]
    servicer: Any


class _RecordingServer:
    """Stands in for a server while an ``add_*Servicer_to_server`` function runs."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.services[service_name] = dict(method_handlers)

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for handler in generic_handlers:
            # grpc.method_handlers_generic_handler() keeps these two; older
            # generated code registers only this way.
            name = handler.service_name() if hasattr(handler, 'service_name') else None
            methods = getattr(handler, '_method_handlers', None)
            if name and methods is not None and name not in self.services:
                self.services[name] = {path.rsplit('/', 1)[-1]: h for path, h in methods.items()}


def record_servicer(servicer: Any, add_to_server: Callable[[Any, Any], None] | None = None
                    ) -> list[ServiceRegistration]:
    """Learn the services ``servicer`` provides.

    :param add_to_server: the generated ``add_*Servicer_to_server`` function;
        found from the servicer's generated base class when omitted.
    :raises TypeError: if ``servicer`` is a class (an instance serves), no
        add function is given or can be found, or it registers nothing.
    """
    if isinstance(servicer, type):
        # Else the search below looks at `type` and says the class derives from
        # no generated servicer, which it may well do.
        raise TypeError(f'servicers take instances, not the class {servicer.__qualname__}: '
                        f'pass {servicer.__qualname__}()')
    if add_to_server is None:
        add_to_server = find_add_function(type(servicer))
    elif not callable(add_to_server):
        raise TypeError(f'the add function given with {type(servicer).__name__} must be the generated '
                        f'add_<Service>Servicer_to_server, not {type(add_to_server).__name__}')
    _import_service_file(add_to_server)
    recorder = _RecordingServer()
    add_to_server(servicer, recorder)
    if not recorder.services:
        raise TypeError(f'{add_to_server.__qualname__} registered no service for {servicer!r}')
    return [ServiceRegistration(name, {method: _checked_answers(f'/{name}/{method}', handler)
                                       for method, handler in handlers.items()}, add_to_server, servicer)
            for name, handlers in recorder.services.items()]


def find_add_function(servicer_class: type) -> Callable[[Any, Any], None]:
    """Find ``add_<Base>_to_server`` beside the generated base class of a servicer.

    :raises TypeError: if no class in the servicer's MRO comes from a module
        with a matching function.
    """
    for base in servicer_class.__mro__:
        module: ModuleType | None = importlib.import_module(base.__module__) \
            if base.__module__ not in ('builtins',) else None
        add = getattr(module, f'add_{base.__name__}_to_server', None) if module else None
        if callable(add):
            return add
    raise TypeError(
        f'{servicer_class.__qualname__} does not derive from a grpcio-generated *Servicer class; '
        'pass its add_*Servicer_to_server function explicitly')
