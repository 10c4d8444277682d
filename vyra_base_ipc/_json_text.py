"""The JSON text of a ``ModuleService`` data item, or what keeps it from being JSON.

``GetData`` sends a mapping or list as JSON, and ``Initialize`` accepts only a
configuration that it can send so. What JSON cannot carry (a YAML date or
timestamp, ``!!binary``, ``!!set``, a key that is none of text, a number,
true/false or null, two keys that are one as JSON text, a value that holds
itself) raises :class:`NotJSON`, naming where in the value and what it is.

Keys of numbers, true/false and null become their JSON text, as
:func:`json.dumps` writes them, also beside text keys: ``{1: 'a', 'b': 'c'}``
is ``{"1": "a", "b": "c"}``. Objects are sorted by key.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, Mapping

__all__ = ['NotJSON', 'json_text']

#: Characters of a value a message shows at most.
_SHOWN = 80
#: A key written plainly in a path (``arm.limits``); any other in brackets.
_PLAIN_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_-]*')
_KEY_TEXT = json.JSONEncoder(allow_nan=True)


class NotJSON(ValueError):
    """A value JSON cannot carry; the message says where and what
    (``arm.calibrated is a datetime.date (2024-01-01)``).

    :ivar offender: the value or key at fault (``None`` for a cycle).
    """

    def __init__(self, message: str, offender: object = None) -> None:
        super().__init__(message)
        self.offender = offender

    @property
    def is_time(self) -> bool:
        """Whether the offender is a date or time (YAML reads them unquoted)."""
        return isinstance(self.offender, (datetime.date, datetime.time))


def json_text(value: object, root: str = 'the value') -> str:
    """``value`` as JSON text (objects sorted by key).

    :param root: how a message names ``value`` itself.
    :raises NotJSON: JSON cannot carry ``value`` (naming where and what).
    """
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        pass  # keys that do not sort together, or a real problem: look closer
    try:
        plain = _plain(value, '', root, set())
    except RecursionError:
        raise NotJSON(f'{root} is nested too deeply') from None
    return json.dumps(plain, sort_keys=True)


def _plain(value: Any, path: str, root: str, holding: set[int]) -> Any:
    """``value`` (at ``path`` in the root value) with every key JSON text, for
    :func:`json.dumps`; ``holding``: the ids of the mappings and lists around it."""
    where = path or root
    if value is None or isinstance(value, (str, int, float)):
        return value
    if not isinstance(value, (Mapping, list, tuple)):
        raise NotJSON(f'{where} is a {_type(value)} ({_shown(value)})', value)
    if id(value) in holding:
        raise NotJSON(f'{where} refers to what contains it (a cycle)')
    holding.add(id(value))
    try:
        if not isinstance(value, Mapping):
            return [_plain(item, f'{path}[{index}]', root, holding) for index, item in enumerate(value)]
        plain: dict[str, Any] = {}
        keys: dict[str, object] = {}
        for key, item in value.items():
            text = _key_text(key, where)
            if text in keys:
                raise NotJSON(f'{where} has the keys {keys[text]!r} and {key!r}, one key in JSON', key)
            keys[text] = key
            plain[text] = _plain(item, _path(path, key), root, holding)
        return plain
    finally:
        holding.discard(id(value))


def _key_text(key: object, where: str) -> str:
    """A key as JSON writes it (text as is; a number, true/false, null as their text)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (int, float)):
        return _KEY_TEXT.encode(key)
    raise NotJSON(f'{where} has a key that is a {_type(key)} ({_shown(key)})', key)


def _path(path: str, key: object) -> str:
    """The path of ``key``'s value in the mapping at ``path``: ``arm.limits``, ``joints[1]``."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f'{path}.{key}' if path else key
    return f'{path}[{key!r}]'


def _type(value: object) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == 'builtins' else f'{kind.__module__}.{kind.__qualname__}'


def _shown(value: object) -> str:
    text = str(value)
    return text if len(text) <= _SHOWN else f'{text[:_SHOWN]}…'
