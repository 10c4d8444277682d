"""``vyra-ipc describe TARGET [SYMBOL]``: a server's services and methods
with their call shape, or one method (or message) with the messages it
uses, in ``.proto`` syntax or as JSON; all from server reflection."""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterator, TextIO

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)

from ._args import EXIT_OK, UsageError, Verb, add_json, add_target, add_timeout
from ._messages import SHAPES, Reflection, kind_of
from ._output import WIDTH
from ._targets import reflection, resolve_target, user_services

__all__ = ['VERB']

_SCALARS = {value: name.removeprefix('TYPE_').lower() for name, value in vars(FieldDescriptor).items()
            if name.startswith('TYPE_') and isinstance(value, int)}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target(parser)
    parser.add_argument('symbol', metavar='SERVICE[/METHOD]', nargs='?',
                        help='one service, one method (Service/Method) or one message type')
    add_timeout(parser, 'deadline of all reflection calls together')
    add_json(parser)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    with reflection(resolve_target(args.target), args.timeout) as server:
        services, methods, messages = _select(server, args.symbol)
        if args.json:
            print(json.dumps(_as_json(services, methods, messages), indent=2), file=out)
        else:
            for line in _as_text(services, methods, messages):
                print(line, file=out)
    return EXIT_OK


def _select(server: Reflection, symbol: str | None
            ) -> tuple[list[ServiceDescriptor], list[MethodDescriptor], list[Descriptor]]:
    """The services, methods (of a service shown alone) and messages ``symbol`` names.

    :raises UsageError: the server has no such symbol, saying what it has.
    """
    if not symbol:
        return [server.service(name) for name in user_services(server.services())], [], []
    symbol = symbol.strip('/')
    if symbol in server.services():
        return [server.service(symbol)], [], []
    if '/' not in symbol:
        message = server.message(symbol)
        if message is not None:
            return [], [], [message]
        if symbol.rpartition('.')[0] not in server.services():
            raise UsageError(f'the server has no service, method or message {symbol!r}; its services: '
                             f'{", ".join(server.services())}')
    try:
        method = server.method(symbol)
    except LookupError as error:
        raise UsageError(str(error)) from None
    return [], [method], [method.input_type, method.output_type]


# -- .proto text ----------------------------------------------------------------------


def _as_text(services: list[ServiceDescriptor], methods: list[MethodDescriptor],
             messages: list[Descriptor]) -> Iterator[str]:
    """The blocks of .proto text, a blank line between them."""
    blocks: list[list[str]] = []
    for service in services:
        blocks.append([f'// {service.file.name}', f'service {service.full_name} {{',
                       *_rpc_lines(list(service.methods), '  '), '}'])
    for method in methods:
        service = method.containing_service
        blocks.append([f'// {service.full_name}  ({service.file.name})', *_rpc_lines([method], '')])
    blocks.extend(_type_block(type_) for type_ in _types_of(messages))
    for index, block in enumerate(blocks):
        if index:
            yield ''
        yield from block


def _rpc_lines(methods: list[MethodDescriptor], indent: str) -> Iterator[str]:
    """``rpc`` lines with their call shapes as aligned comments beside them,
    or above them where that would be wider than the terminal; none for a
    service without methods (``service Empty {}`` is valid .proto)."""
    if not methods:
        return
    texts = []
    for method in methods:
        package = method.containing_service.file.package
        request = _relative(method.input_type.full_name, package)
        response = _relative(method.output_type.full_name, package)
        request = ('stream ' if method.client_streaming else '') + request
        response = ('stream ' if method.server_streaming else '') + response
        texts.append(f'{indent}rpc {method.name}({request}) returns ({response});')
    width = max(len(text) for text in texts)
    shapes = [SHAPES[kind_of(method)] for method in methods]
    if width + 4 + max(len(shape) for shape in shapes) <= WIDTH:
        for text, shape in zip(texts, shapes, strict=True):
            yield f'{text:<{width}}  // {shape}'
        return
    for text, shape in zip(texts, shapes, strict=True):  # too wide for comments beside
        yield f'{indent}// {shape}'
        yield text


def _types_of(messages: list[Descriptor]) -> Iterator[Descriptor | EnumDescriptor]:
    """``messages``, then the messages and enums their fields use, depth
    first, each once. Walked with a stack of its own, not recursively: a
    server may describe a chain of types deeper than Python's recursion limit."""
    seen: set[str] = set()
    stack: list[Iterator[Descriptor | EnumDescriptor]] = [iter(messages)]
    while stack:
        type_ = next(stack[-1], None)
        if type_ is None:
            stack.pop()
        elif type_.full_name not in seen:
            seen.add(type_.full_name)
            yield type_
            if isinstance(type_, Descriptor):
                stack.append(iter([used for field in type_.fields for used in _types_used(field)]))


def _type_block(type_: Descriptor | EnumDescriptor) -> list[str]:
    """A message or enum in .proto syntax."""
    if isinstance(type_, EnumDescriptor):
        return [f'enum {type_.full_name} {{',
                *(f'  {value.name} = {value.number};' for value in type_.values), '}']
    package = type_.file.package
    lines = [f'message {type_.full_name} {{']
    oneofs_shown: set[str] = set()
    for field in type_.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name != f'_{field.name}':  # a real oneof, not proto3 optional
            if oneof.name not in oneofs_shown:
                oneofs_shown.add(oneof.name)
                lines.append(f'  oneof {oneof.name} {{')
                lines += [f'    {_field_type(member, package)} {member.name} = {member.number};'
                          for member in oneof.fields]
                lines.append('  }')
        else:
            optional = 'optional ' if oneof is not None else ''
            lines.append(f'  {optional}{_field_type(field, package)} {field.name} = {field.number};')
    return [*lines, '}']


def _types_used(field: FieldDescriptor) -> list[Descriptor | EnumDescriptor]:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        return [type_ for value in (message.fields_by_name['value'],) for type_ in _types_used(value)]
    if message is not None:
        return [message]
    return [field.enum_type] if field.enum_type is not None else []


def _field_type(field: FieldDescriptor, package: str) -> str:
    """The type of ``field`` as a .proto file writes it (names relative to ``package``)."""
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = message.fields_by_name['key'], message.fields_by_name['value']
        return f'map<{_field_type(key, package)}, {_field_type(value, package)}>'
    if message is not None:
        name = _relative(message.full_name, package)
    elif field.enum_type is not None:
        name = _relative(field.enum_type.full_name, package)
    else:
        name = _SCALARS[field.type]
    return f'repeated {name}' if field.is_repeated else name


def _relative(full_name: str, package: str) -> str:
    return full_name.removeprefix(f'{package}.') if package else full_name


# -- JSON -----------------------------------------------------------------------------


def _as_json(services: list[ServiceDescriptor], methods: list[MethodDescriptor],
             messages: list[Descriptor]) -> dict[str, Any]:
    return {
        'services': [{'name': service.full_name, 'file': service.file.name,
                      'methods': [_method_json(method) for method in service.methods]}
                     for service in services],
        'methods': [_method_json(method) for method in methods],
        'types': [_type_json(type_) for type_ in _types_of(messages)],
    }


def _method_json(method: MethodDescriptor) -> dict[str, Any]:
    return {'name': method.name, 'path': f'/{method.containing_service.full_name}/{method.name}',
            'shape': SHAPES[kind_of(method)], 'client_streaming': method.client_streaming,
            'server_streaming': method.server_streaming, 'request': method.input_type.full_name,
            'response': method.output_type.full_name}


def _type_json(type_: Descriptor | EnumDescriptor) -> dict[str, Any]:
    if isinstance(type_, EnumDescriptor):
        return {'name': type_.full_name, 'kind': 'enum',
                'values': {value.name: value.number for value in type_.values}}
    return {'name': type_.full_name, 'kind': 'message',
            'fields': [{'name': field.name, 'number': field.number, 'type': _field_type(field, ''),
                        'oneof': field.containing_oneof.name if field.containing_oneof else None}
                       for field in type_.fields]}


VERB = Verb('describe', 'services and methods of a server with their call shapes, or one method or '
                        'message with the messages it uses (from server reflection)', _add_arguments, _run)
