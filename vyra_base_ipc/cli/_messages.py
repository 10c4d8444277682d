"""Message types from a server's reflection service: the descriptors, a
generated-stub look-alike for the clients, JSON both ways, and the text
``describe`` prints."""

from __future__ import annotations

import json
from typing import Any, Iterator

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
import yaml

from .._methods import MethodKind

__all__ = ['Reflection', 'kind_of', 'message_text', 'parse_request', 'service_text', 'stub_class',
           'to_json']

_SCALARS = {value: name.removeprefix('TYPE_').lower() for name, value in vars(FieldDescriptor).items()
            if name.startswith('TYPE_') and isinstance(value, int)}

SHAPES = {
    MethodKind.UNARY_UNARY: 'unary',
    MethodKind.UNARY_STREAM: 'server streaming',
    MethodKind.STREAM_UNARY: 'client streaming',
    MethodKind.STREAM_STREAM: 'bidirectional streaming',
}


class Reflection:
    """The services and messages a server describes through reflection
    (on its gRPC lane)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self._database)

    def services(self) -> list[str]:
        """Full names of the services the server has."""
        return sorted(self._database.get_services())

    def service(self, name: str) -> ServiceDescriptor:
        """:raises KeyError: the server has no such service."""
        return self.pool.FindServiceByName(name)

    def method(self, path: str) -> MethodDescriptor:
        """The method ``Service/Method`` (or ``Service.Method``, with or without a leading ``/``).

        :raises LookupError: no such service or method, saying which ones there are.
        """
        service_name, _, method_name = path.strip('/').replace('/', '.').rpartition('.')
        services = self.services()
        if service_name not in services:
            raise LookupError(f'the server has no service {service_name!r}; it has: {", ".join(services)}')
        service = self.service(service_name)
        method = service.methods_by_name.get(method_name)
        if method is None:
            raise LookupError(f'{service_name} has no method {method_name!r}; it has: '
                              f'{", ".join(m.name for m in service.methods)}')
        return method


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def kind_of(method: MethodDescriptor) -> MethodKind:
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
    method that streams its requests a list of them.

    :raises ValueError: the text is not JSON/YAML, or does not fit the
        request message (the message names the field and the type).
    """
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as error:
        raise ValueError(f'the request is neither JSON nor YAML: {error}') from None
    request_class = message_class(method.input_type)
    if method.client_streaming:
        if not isinstance(value, list):
            raise ValueError(f'{method.name} streams its requests: give a list of '
                             f'{method.input_type.full_name} objects')
        return [_message(item, request_class, f'request {index}') for index, item in enumerate(value)]
    return _message(value, request_class, 'the request')


def _message(value: Any, message_type: type[Message], what: str) -> Message:
    if not isinstance(value, dict):
        raise ValueError(f'{what} must be an object of {message_type.DESCRIPTOR.full_name} fields, '
                         f'not {json.dumps(value)}')
    try:
        return json_format.ParseDict(value, message_type())
    except json_format.ParseError as error:
        raise ValueError(f'{what} is not a {message_type.DESCRIPTOR.full_name}: {error}') from None


def to_json(message: Message) -> str:
    """``message`` as JSON with the .proto field names, default values included."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2,
                                     always_print_fields_with_no_presence=True)


def service_text(service: ServiceDescriptor) -> Iterator[str]:
    """The lines ``describe SERVICE`` prints."""
    yield f'service {service.full_name}  ({service.file.name})'
    for method in service.methods:
        yield f'  {method_line(method)}'


def method_line(method: MethodDescriptor) -> str:
    request = ('stream ' if method.client_streaming else '') + method.input_type.full_name
    response = ('stream ' if method.server_streaming else '') + method.output_type.full_name
    return f'rpc {method.name}({request}) returns ({response});  # {SHAPES[kind_of(method)]}'


def message_text(message: Descriptor, seen: set[str] | None = None) -> Iterator[str]:
    """``message`` in .proto syntax, followed by the messages it uses."""
    seen = set() if seen is None else seen
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    yield f'message {message.full_name} {{'
    nested = []
    for field in message.fields:
        yield f'  {_field_type(field)} {field.name} = {field.number};'
        if field.message_type is not None:
            nested.append(field.message_type)
    yield '}'
    for used in nested:
        shown: Descriptor | None = used
        if used.GetOptions().map_entry:
            shown = used.fields_by_name['value'].message_type
        if shown is not None:
            yield from message_text(shown, seen)


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name['key'], field.message_type.fields_by_name['value']
        return f'map<{_field_type(key)}, {_field_type(value)}>'
    if field.message_type is not None:
        name = field.message_type.full_name
    elif field.enum_type is not None:
        name = field.enum_type.full_name
    else:
        name = _SCALARS[field.type]
    return f'repeated {name}' if _repeated(field) else name


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)
