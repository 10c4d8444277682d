"""Message types from a server's reflection service: the descriptors, a
generated-stub look-alike for the clients, and JSON (or YAML) both ways."""

from __future__ import annotations

import base64
import importlib
import json
import re
from typing import Any, Hashable

from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.message import DecodeError, Message
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse
from grpc_reflection.v1alpha.reflection_pb2_grpc import ServerReflectionStub
import yaml

from .._methods import MethodKind
from .._shared_buffer import ReceivedBuffers
from ..exceptions import IPCError, SharedMemoryError

__all__ = ['SHAPES', 'Reflection', 'detail_json', 'inline_buffers', 'kind_of', 'message_class',
           'parse_request', 'stub_class', 'to_json']

#: The call shape of each kind of method, as ``describe`` names it.
SHAPES = {
    MethodKind.UNARY_UNARY: 'unary',
    MethodKind.UNARY_STREAM: 'server streaming',
    MethodKind.STREAM_UNARY: 'client streaming',
    MethodKind.STREAM_STREAM: 'bidirectional streaming',
}


class Reflection:
    """The services and messages a server describes through reflection (on
    its gRPC lane). Lookups call the server; they raise ``grpc.RpcError``
    when it fails, and :class:`~vyra_base_ipc.IPCError` (INTERNAL) when it
    answers with descriptors that do not parse or do not build (a broken or
    hostile server: protobuf raises DecodeError or TypeError)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._database = _Database(channel)
        self.pool = descriptor_pool.DescriptorPool(self._database)
        self._services: list[str] | None = None

    def services(self) -> list[str]:
        """Full names of the services the server has, sorted."""
        if self._services is None:
            self._services = sorted(self._database.get_services())
        return self._services

    def service(self, name: str) -> ServiceDescriptor:
        """The service ``name``, one of :meth:`services`.

        :raises LookupError: the server has no such service, saying which it has.
        :raises IPCError: (INTERNAL) the server lists it, but does not describe it.
        """
        if name not in self.services():
            raise LookupError(f'the server has no service {name!r}; it has: {", ".join(self.services())}')
        try:
            return self.pool.FindServiceByName(name)
        except (DecodeError, TypeError) as error:
            raise _unusable(name, error) from None
        except KeyError:  # (listed, as a service of a generic handler may be, but in no file)
            details = f'the server lists the service {name}, but its reflection does not describe it'
            raise IPCError(grpc.StatusCode.INTERNAL, details) from None

    def method(self, path: str) -> MethodDescriptor:
        """The method ``Service/Method`` (or ``Service.Method``, with or without a leading ``/``).

        :raises LookupError: no such service or method, saying which ones there are;
            a service without a method, or a method without its service, saying
            what to give instead.
        """
        name = path.strip('/')
        if name in self.services():
            methods = [f'{name}/{method.name}' for method in self.service(name).methods]
            raise LookupError(f'{name} is a service; give SERVICE/METHOD' + (
                f', one of: {", ".join(methods)}' if methods else ' (it has no methods)'))
        service_name, _, method_name = name.replace('/', '.').rpartition('.')
        if not service_name:
            owners = [f'{owner}/{method_name}' for owner in self.services()
                      if method_name in self.service(owner).methods_by_name]
            raise LookupError(f'{path!r} names no service; give SERVICE/METHOD' + (
                f': {" or ".join(owners)}' if owners else f'; the server has: {", ".join(self.services())}'))
        service = self.service(service_name)
        method = service.methods_by_name.get(method_name)
        if method is None:
            raise LookupError(f'{service_name} has no method {method_name!r}; it has' + (
                f': {", ".join(m.name for m in service.methods)}' if service.methods else ' none'))
        return method

    def message(self, name: str) -> Descriptor | None:
        """The message type ``name`` if the server knows it, else ``None``."""
        try:
            return self.pool.FindMessageTypeByName(name)
        except KeyError:
            return None
        except (DecodeError, TypeError) as error:
            raise _unusable(name, error) from None


class _Database(ProtoReflectionDescriptorDatabase):
    """grpcio-reflection's descriptor database, kept to what a server that
    answers reflection wrongly can do: fail its lookups in one line.

    grpcio-reflection asserts that an error answer is NOT_FOUND and that
    every question gets an answer (AssertionError, StopIteration: a
    traceback, and ``list`` fails for every server); here such answers fail
    as a call does (:class:`_Unanswered`, a ``grpc.RpcError``). And a file
    that depends on itself, directly or through others, is refused
    (TypeError) before protobuf sees it: upb's pool loads the files a file
    depends on recursively, so a cycle overflows the C stack (SIGSEGV).
    """

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self._reflection: Any = ServerReflectionStub(channel)  # (typeshed's stub has no methods)
        self._acyclic: set[str] = set()  # files whose dependencies were checked

    def _do_one_request(self, request: ServerReflectionRequest, key: Any) -> ServerReflectionResponse:
        answer = next(self._reflection.ServerReflectionInfo(iter([request])), None)
        if answer is None:
            raise _Unanswered(grpc.StatusCode.INTERNAL, 'the server ended the reflection stream without '
                                                        'an answer to the question asked')
        if answer.WhichOneof('message_response') == 'error_response':
            error = answer.error_response
            if error.error_code == grpc.StatusCode.NOT_FOUND.value[0]:
                raise KeyError(key)  # (as grpcio-reflection: the pool takes it as "no such symbol")
            code = next((code for code in grpc.StatusCode if code.value[0] == error.error_code),
                        grpc.StatusCode.UNKNOWN)
            raise _Unanswered(code, f'it answered with error {error.error_code}: {error.error_message}')
        return answer

    def FindFileByName(self, name: str) -> FileDescriptorProto:
        return self._checked(super().FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptorProto:
        return self._checked(super().FindFileContainingSymbol(symbol))

    def _checked(self, file: FileDescriptorProto) -> FileDescriptorProto:
        """``file``, after checking that no file it depends on (at any depth) depends on itself.

        :raises TypeError: a cycle, naming its files.
        """
        stack = [(file.name, iter(file.dependency))]
        while stack:
            dependency = next(stack[-1][1], None)
            if dependency is None:
                self._acyclic.add(stack.pop()[0])
                continue
            if dependency in self._acyclic:
                continue
            names = [name for name, _ in stack]
            if dependency in names:
                cycle = [*names[names.index(dependency):], dependency]
                raise TypeError(f'its files depend on themselves: {" -> ".join(cycle)}')
            try:
                stack.append((dependency, iter(super().FindFileByName(dependency).dependency)))
            except KeyError:
                continue  # no such file: the pool names it
        return file


class _Unanswered(grpc.RpcError):
    """A question to server reflection answered with an error, or not at all: as a call that failed."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _unusable(name: str, error: Exception) -> IPCError:
    details = ' '.join(str(error).split())[:300]
    return IPCError(grpc.StatusCode.INTERNAL,
                    f'the server described {name} with descriptors that cannot be used '
                    f'(server reflection): {type(error).__name__}: {details}')


def message_class(descriptor: Descriptor) -> type[Message]:
    """The message class of a reflected message type.

    :raises IPCError: (INTERNAL) protobuf cannot build it: a chain of message
        types deeper than Python's recursion limit, which protobuf walks recursively.
    """
    try:
        return message_factory.GetMessageClass(descriptor)
    except RecursionError as error:
        raise _unusable(descriptor.full_name, error) from None


def kind_of(method: MethodDescriptor) -> MethodKind:
    """The call shape of ``method``."""
    return MethodKind.of(method.client_streaming, method.server_streaming)


def stub_class(service: ServiceDescriptor) -> type:
    """A class shaped like a grpcio-generated ``*Stub`` of ``service``, with
    the reflected message classes, for IPCHandler and SyncIPCHandler."""
    methods = [(method.name, f'/{service.full_name}/{method.name}', kind_of(method).value,
                message_class(method.input_type), message_class(method.output_type))
               for method in service.methods]

    def __init__(self: Any, channel: Any) -> None:
        for name, path, kind, request, response in methods:
            setattr(self, name, getattr(channel, kind)(path, request_serializer=request.SerializeToString,
                                                       response_deserializer=response.FromString))
    return type(f'{service.name}Stub', (), {'__init__': __init__, '__qualname__': f'{service.name}Stub'})


def parse_request(text: str, method: MethodDescriptor) -> Message | list[Message]:
    """The request(s) of a call from JSON or YAML text: one object, or for a
    method that streams its requests a list of them. Empty text is ``{}``.

    :raises ValueError: the text is not JSON/YAML (saying where), or does
        not fit the request message (naming the field and the type).
    """
    value = _load(text)
    request_class = message_class(method.input_type)
    if method.client_streaming:
        if not isinstance(value, list):
            raise ValueError(f'{method.name} streams its requests: give a list of '
                             f'{method.input_type.full_name} objects')
        return [_message(item, request_class, f'request {index}') for index, item in enumerate(value)]
    return _message(value, request_class, 'the request')


def _load(text: str) -> Any:
    """The value of JSON or YAML ``text``; a key given twice in one object is
    refused (json and PyYAML would keep the last, silently; protobuf's own
    JSON parser refuses it too), and so is text nested deeper than their
    parsers' recursion can go."""
    if not text.strip():
        return {}
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise ValueError(f'the request gives {error} twice') from None
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except ValueError as json_error:
        try:
            return yaml.load(text, Loader=_UniqueKeyLoader)
        except _DuplicateKey as error:
            raise ValueError(f'the request gives {error} twice') from None
        except RecursionError:
            raise ValueError(_TOO_DEEP) from None
        except yaml.YAMLError as yaml_error:
            if text.lstrip().startswith(('{', '[', '"')):
                raise ValueError(f'the request is not valid JSON: {json_error}') from None
            raise ValueError(f'the request is neither JSON nor YAML: {_yaml_problem(yaml_error)}') from None


_TOO_DEEP = ("the request is nested too deeply to read (lists or objects within each other, beyond "
             "Python's recursion limit)")


class _DuplicateKey(Exception):
    """A key given twice in one object of the request (its text: the key, and where in YAML)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    unique = dict(pairs)
    if len(unique) < len(pairs):  # (a set, not a count per key: a request may have many)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f'the key {key!r}')
            seen.add(key)
    return unique


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':
                continue  # '<<': keys merged in are overridden by design
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):  # (PyYAML itself refuses the others)
                if key in seen:
                    mark = key_node.start_mark
                    raise _DuplicateKey(f'the key {key!r} (line {mark.line + 1}, column {mark.column + 1})')
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, 'problem', None) or str(error)
    mark = getattr(error, 'problem_mark', None)
    return f'{problem} (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else problem


#: ``key:value``, which YAML reads as a string.
_UNSPACED_KEY = re.compile(r'(?<![\w:])([A-Za-z_]\w*):(?=[^\s:/])')


def _message(value: Any, message_type: type[Message], what: str) -> Message:
    if not isinstance(value, dict):
        # `count:2` is one string to YAML: its mappings need a space after the colon.
        unspaced = _UNSPACED_KEY.search(value) if isinstance(value, str) else None
        hint = (f' (YAML reads {unspaced.group(0)}… as text: a key needs a space after its colon,'
                f' {unspaced.group(1)}: …)' if unspaced else '')
        raise ValueError(f'{what} must be an object of {message_type.DESCRIPTOR.full_name} fields, '
                         f'not {_start_of(value)}{hint}')
    try:
        return json_format.ParseDict(value, message_type())
    except (json_format.ParseError, TypeError) as error:
        raise ValueError(f'{what} is not a {message_type.DESCRIPTOR.full_name}: {error}') from None


def _start_of(value: Any, limit: int = 200) -> str:
    """The first ``limit`` characters of ``value`` as JSON, ``…`` after them
    where there is more. Encoded piece by piece and no further: a few YAML
    aliases make a value of billions of items, whose whole text would never
    end; an alias may also make a list that holds itself, or one too deep to encode."""
    text = ''
    try:
        for piece in json.JSONEncoder(default=str).iterencode(value):
            text += piece
            if len(text) > limit:
                break
        else:
            return text
    except (RecursionError, ValueError):  # (ValueError: "Circular reference detected")
        pass
    return text[:limit] + '…'


#: The message naming a buffer that travels beside a call (vyra_base_ipc/shared_memory.proto).
_BUFFER_REF = 'vyra.ipc.SharedBufferRef'


def inline_buffers(message: Message, buffers: ReceivedBuffers) -> None:
    """Copy the bytes of each ``vyra.ipc.SharedBufferRef`` in ``message``
    (at any depth) that came as shared memory, one of ``buffers`` (the fast
    lane's), into its ``inline_data``: where JSON shows them, as the gRPC
    lane sends them. A reference to no buffer sent is left as it came."""
    if not len(buffers):
        return
    stack = [message]
    while stack:  # (not recursive: a message is as deep as the server's types are)
        current: Any = stack.pop()
        if current.DESCRIPTOR.full_name == _BUFFER_REF:
            if not current.inline_data and current.handle in buffers:
                try:
                    current.inline_data = buffers.view(current).tobytes()
                except SharedMemoryError:  # another size than the buffer's
                    pass
            continue
        for field, value in current.ListFields():
            if field.message_type is None:
                continue
            if field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name['value'].message_type is not None:
                    stack.extend(value.values())
            elif field.is_repeated:
                stack.extend(value)
            else:
                stack.append(value)


def to_json(message: Message) -> str:
    """``message`` as JSON with the .proto field names, default values
    included, keys sorted (the same order for every message of a stream)."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2, sort_keys=True,
                                     always_print_fields_with_no_presence=True)


def detail_json(detail: any_pb2.Any) -> str:
    """A status detail (a packed ``Any``) as one line of JSON, as grpcurl shows
    it: ``{"@type": ..., fields}`` where its type is known here (the
    ``google.rpc`` error details, if googleapis-common-protos is installed),
    else ``{"@type": ..., "value": <base64>}``."""
    try:  # (registers the google.rpc details' types; the package does not depend on them)
        importlib.import_module('google.rpc.error_details_pb2')
    except ImportError:
        pass
    try:
        shown = json_format.MessageToDict(detail, preserving_proto_field_name=True)
    except (TypeError, KeyError, json_format.Error, DecodeError):  # unknown type, or bytes that do not parse
        shown = {'@type': detail.type_url, 'value': base64.b64encode(detail.value).decode()}
    return json.dumps(shown, ensure_ascii=False, sort_keys=True)
