"""Socket path resolution and validation (no sockets involved)."""

from pathlib import Path

import pytest

from vyra_base_ipc import MAX_SOCKET_PATH_BYTES, default_socket_path, resolve_socket_path
from vyra_base_ipc.address import validate_module_name


def test_explicit_path_wins_over_environment() -> None:
    env = {'VYRA_IPC_SOCKET': '/run/env.sock', 'VYRA_MODULE_NAME': 'envmod'}
    assert resolve_socket_path('/run/explicit.sock', environ=env) == Path('/run/explicit.sock')


def test_environment_socket_wins_over_module_name() -> None:
    env = {'VYRA_IPC_SOCKET': '/run/env.sock', 'VYRA_MODULE_NAME': 'envmod'}
    assert resolve_socket_path(module_name='argmod', environ=env) == Path('/run/env.sock')


def test_module_name_argument_gives_documented_default_path() -> None:
    assert resolve_socket_path(module_name='my_module', environ={}) == Path('/tmp/my_module_ipc.sock')


@pytest.mark.parametrize('variable', ['VYRA_MODULE_NAME', 'MODULE_NAME'])
def test_module_name_from_environment(variable: str) -> None:
    assert resolve_socket_path(environ={variable: 'arm2'}) == Path('/tmp/arm2_ipc.sock')


def test_vyra_module_name_wins_over_module_name() -> None:
    env = {'VYRA_MODULE_NAME': 'first', 'MODULE_NAME': 'second'}
    assert resolve_socket_path(environ=env) == Path('/tmp/first_ipc.sock')


def test_nothing_configured_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match='no IPC socket configured.*VYRA_IPC_SOCKET'):
        resolve_socket_path(environ={})


@pytest.mark.parametrize('name', ['Demo', '1demo', 'demo-module', 'demo module', '', '_demo', 'démo'])
def test_invalid_module_names_are_rejected_naming_the_value(name: str) -> None:
    with pytest.raises(ValueError, match='invalid module name'):
        default_socket_path(name)


def test_module_name_of_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match='module name must be a str'):
        validate_module_name(42)


@pytest.mark.parametrize('name', ['a', 'demo', 'arm_2', 'x9_y'])
def test_valid_module_names(name: str) -> None:
    assert validate_module_name(name) == name


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_socket_path('sub/x.sock', environ={}) == tmp_path / 'sub' / 'x.sock'


def test_path_at_the_length_limit_is_accepted() -> None:
    path = '/tmp/' + 'a' * (MAX_SOCKET_PATH_BYTES - len('/tmp/'))
    assert len(path) == MAX_SOCKET_PATH_BYTES
    assert str(resolve_socket_path(path, environ={})) == path


def test_path_over_the_limit_names_path_and_limit() -> None:
    path = '/tmp/' + 'a' * (MAX_SOCKET_PATH_BYTES + 1 - len('/tmp/'))
    with pytest.raises(ValueError) as error:
        resolve_socket_path(path, environ={})
    assert path in str(error.value)
    assert '108 bytes' in str(error.value) and '107' in str(error.value)


def test_length_counts_bytes_not_characters() -> None:
    path = '/tmp/' + 'é' * 52  # 5 + 104 bytes
    with pytest.raises(ValueError, match='109 bytes'):
        resolve_socket_path(path, environ={})


@pytest.mark.parametrize('path, message', [
    ('', 'empty'),
    ('   ', 'empty'),
    ('/tmp/a\0b', 'NUL'),
    ('/tmp/dir/', 'names a directory'),
])
def test_malformed_paths_are_rejected(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_socket_path(path, environ={})


@pytest.mark.parametrize('path', [42, b'/tmp/x.sock', ['/tmp/x.sock']])
def test_path_of_wrong_type_is_a_type_error(path: object) -> None:
    with pytest.raises(TypeError, match='socket path must be'):
        resolve_socket_path(path, environ={})  # type: ignore[arg-type]


def test_environment_socket_is_validated_too() -> None:
    with pytest.raises(ValueError, match='empty'):
        resolve_socket_path(environ={'VYRA_IPC_SOCKET': ' '})


@pytest.mark.parametrize('path', ['@demo_ipc', 'unix-abstract:demo_ipc', '\0demo_ipc'])
def test_abstract_namespace_sockets_are_refused_with_the_reason(path: str) -> None:
    with pytest.raises(ValueError, match='abstract-namespace socket: not supported.*any process'):
        resolve_socket_path(path, environ={})


def test_a_socket_path_whose_fast_lane_socket_would_be_too_long_says_how_long_it_may_be() -> None:
    from vyra_base_ipc import IPCServer
    path = '/tmp/' + 'a' * (MAX_SOCKET_PATH_BYTES - 6 + 1 - len('/tmp/.sock')) + '.sock'  # 102 bytes
    with pytest.raises(ValueError) as error:
        IPCServer(socket_path=path)
    message = str(error.value)
    assert path in message and path.replace('.sock', '.ttrpc.sock') in message
    assert '108 bytes long' in message and 'at most 101 bytes' in message and 'ttrpc_socket_path' in message
    # Either way out is taken; a path one byte shorter fits as it is.
    IPCServer(socket_path=path, ttrpc=False)
    IPCServer(socket_path=path, ttrpc_socket_path='/tmp/short.ttrpc.sock')
    IPCServer(socket_path=path[:5] + path[6:])
