"""The default ModuleService: command registry, Initialize, GetData."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from pathlib import Path
import shutil
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import LANES, NOBODY, OTHER_UID, ServerProcess
from vyra_base_ipc import (
    CommandError,
    IPCHandler,
    IPCRemoteError,
    IPCServer,
    ModuleService,
    SyncIPCHandler,
    command,
    ttrpc_pb2,
)
from vyra_base_ipc import module_service_pb2 as pb
from vyra_base_ipc import module_service_pb2_grpc as pb_grpc

NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


@pytest.fixture
def server(start_server, socket_path: Path, tmp_path: Path) -> ServerProcess:
    """The echo server, with ``tmp_path`` as the configuration directory
    Initialize may read from."""
    return start_server(socket_path, '--config-dir', str(tmp_path))


@pytest.fixture
def module(server: ServerProcess):
    with SyncIPCHandler(server.socket_path, pb_grpc.ModuleServiceStub, timeout=10) as client:
        yield client


def execute(client: SyncIPCHandler, name: str, **parameters: str) -> pb.CommandResponse:
    return client.call_method('ExecuteCommand', pb.CommandRequest(command=name, parameters=parameters))


def initialize(client: SyncIPCHandler, path: object) -> pb.InitResponse:
    return client.call_method('Initialize', pb.InitRequest(config_path=str(path)))


def test_ping_answers_pong(module: SyncIPCHandler) -> None:
    assert (execute(module, 'ping').status_code, execute(module, 'ping').result) == (0, 'pong')


def test_status_reports_the_module(module: SyncIPCHandler) -> None:
    answer = execute(module, 'status')
    status = json.loads(answer.result)
    assert answer.status_code == 0
    assert status['module'] == 'test_module'
    assert status['initialized'] is False
    assert {'ping', 'status'} <= set(status['commands'])


def test_unknown_command_is_not_found_and_the_server_keeps_serving(module: SyncIPCHandler) -> None:
    answer = execute(module, 'self_destruct')
    assert answer.status_code == NOT_FOUND
    assert "unknown command 'self_destruct'" in answer.result and 'ping' in answer.result
    assert execute(module, 'ping').result == 'pong'


def test_an_answer_quotes_at_most_the_start_of_a_long_name_from_the_caller(module: SyncIPCHandler) -> None:
    name = 'x' * 1_000_000
    answer = execute(module, name)
    assert answer.status_code == NOT_FOUND
    assert answer.result.startswith(f"unknown command {'x' * 120!r}… (1000000 characters); available: ")
    with pytest.raises(IPCRemoteError) as error:
        module.call_method('GetData', pb.DataRequest(key=name))
    assert error.value.code is grpc.StatusCode.NOT_FOUND and '(1000000 characters)' in error.value.details
    answer = module.call_method('Initialize', pb.InitRequest(config_path='/' + name))
    assert not answer.success and answer.message.endswith('(1000001 characters) is longer than any path may be')
    for reply in (answer.message, error.value.details):
        assert len(reply) < 1000


def test_initialize_loads_yaml_and_get_data_returns_it(module: SyncIPCHandler, tmp_path: Path) -> None:
    config = tmp_path / 'module.yaml'
    config.write_text('speed: 0.5\njoints: [a, b]\n')
    answer = initialize(module, config)
    assert answer.success, answer.message
    assert str(config) in answer.message
    data = module.call_method('GetData', pb.DataRequest(key='config'))
    assert data.content_type == 'application/json'
    assert json.loads(data.result) == {'speed': 0.5, 'joints': ['a', 'b']}
    assert json.loads(execute(module, 'status').result)['initialized'] is True


def test_initialize_loads_json(module: SyncIPCHandler, tmp_path: Path) -> None:
    config = tmp_path / 'module.json'
    config.write_text(json.dumps({'mode': 'auto'}))
    assert initialize(module, config).success
    assert json.loads(module.call_method('GetData', pb.DataRequest(key='config')).result) == {'mode': 'auto'}


@pytest.mark.asyncio
@pytest.mark.parametrize('lane', LANES)
async def test_a_def_data_provider_that_blocks_does_not_hold_up_other_calls(
        start_server, socket_path: Path, lane: str) -> None:
    """Audit: a ``def`` data provider ran on the server's event loop, so one
    waiting on slow I/O held up every call. It runs in the handler threads,
    as ``def`` commands do: while it waits for a later call, that call and
    others are served."""
    start_server(socket_path, script='command_server.py').wait_serving(ttrpc=True)
    async with IPCHandler(socket_path, pb_grpc.ModuleServiceStub, lane=lane, timeout=5) as ipc:
        async def run(name: str) -> str:
            return (await ipc.call_method('ExecuteCommand', pb.CommandRequest(command=name))).result

        gate = asyncio.ensure_future(ipc.call_method('GetData', pb.DataRequest(key='gate'), timeout=30))
        deadline = time.monotonic() + 10
        while await run('gate_state') != 'waiting':  # each answer within 5 s, or the test fails
            assert not gate.done(), gate
            assert time.monotonic() < deadline, 'the gate provider did not start within 10 s'
        assert await run('ping') == 'pong'
        status = await ipc.call_method('GetData', pb.DataRequest(key='status'))
        assert json.loads(status.result)['module'] == 'arm'
        assert not gate.done()
        assert await run('open_gate') == 'opened'
        data = await asyncio.wait_for(gate, 10)
        assert (data.result, data.content_type) == (b'opened', 'text/plain')
        assert ipc.lane_in_use == lane


@pytest.mark.parametrize('lane', LANES)
def test_a_command_error_takes_a_status_number_and_its_misuse_is_internal_naming_it(
        start_server, socket_path: Path, lane: str) -> None:
    """Audit: ``CommandError('busy', 14)`` answered UNKNOWN (an AttributeError
    as the answer was made), and ``CommandError(..., grpc.StatusCode.OK)`` made a
    failed command look done. A status number is taken; OK or what is no
    status fails the handler as any bug does: INTERNAL, naming the misuse."""
    start_server(socket_path, script='command_server.py').wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, pb_grpc.ModuleServiceStub, lane=lane, timeout=10) as client:
        busy = execute(client, 'busy')
        assert (busy.status_code, busy.result) == (grpc.StatusCode.UNAVAILABLE.value[0], 'homing, try later')
        jammed = execute(client, 'jammed')
        assert jammed.status_code == INTERNAL
        assert jammed.result == ("jammed failed: TypeError('CommandError code must be an error status (a "
                                 'grpc.StatusCode other than OK, or its number, 1 to 16), not '
                                 "grpc.StatusCode.OK: a failed command cannot answer OK')")
        unpowered = execute(client, 'unpowered')
        assert unpowered.status_code == INTERNAL
        assert unpowered.result.startswith('unpowered failed: TypeError(') and \
            "not 'UNAVAILABLE' (a str)" in unpowered.result, unpowered.result
        assert execute(client, 'ping').result == 'pong'
        assert client.lane_in_use == lane


def test_command_error_takes_an_error_status_or_its_number_and_refuses_anything_else() -> None:
    assert CommandError('x').code is grpc.StatusCode.FAILED_PRECONDITION
    assert CommandError('x', grpc.StatusCode.UNAVAILABLE).code is grpc.StatusCode.UNAVAILABLE
    assert CommandError('x', 14).code is grpc.StatusCode.UNAVAILABLE
    assert CommandError('x', code=16).code is grpc.StatusCode.UNAUTHENTICATED
    for code, named in [(grpc.StatusCode.OK, 'not grpc.StatusCode.OK: a failed command cannot answer OK'),
                        (0, 'not 0 (OK): a failed command cannot answer OK'),
                        (17, 'not 17: no status has that number'), (-1, 'not -1: no status has that number'),
                        ('UNAVAILABLE', "not 'UNAVAILABLE' (a str)"), (None, 'not None (a NoneType)'),
                        (True, 'not True (a bool)'), (14.0, 'not 14.0 (a float)')]:
        with pytest.raises(TypeError) as error:
            CommandError('x', code)
        assert str(error.value).endswith(named), error.value
    error = CommandError('x')
    error.code = 4  # a status set later is held to the same rule
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(TypeError, match='not grpc.StatusCode.OK'):
        error.code = grpc.StatusCode.OK
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize('content, message', [
    (b'arm:\n  calibrated: 2024-01-01\n', 'arm.calibrated is a datetime.date (2024-01-01)'),
    (b'log:\n  - at: 2024-01-01T10:00:00Z\n', 'log[0].at is a datetime.datetime (2024-01-01 10:00:00+00:00)'),
    (b'blob: !!binary aGk=\n', "blob is a bytes (b'hi')"),
    (b'tools: !!set {a}\n', "tools is a set ({'a'})"),
    (b'2024-01-01: start\n', 'the top level has a key that is a datetime.date (2024-01-01)'),
    (b'joints: {1: a, "1": b}\n', "joints has the keys 1 and '1'"),
    (b'loop: &x [*x]\n', 'loop[0] refers to what contains it'),
], ids=['date', 'timestamp', 'binary', 'set', 'date-key', 'clashing-keys', 'cycle'])
def test_initialize_refuses_a_configuration_json_cannot_carry_naming_where_and_what(
        module: SyncIPCHandler, tmp_path: Path, content: bytes, message: str) -> None:
    """Audit: a YAML date or keys like 1 and 'b' loaded, and GetData('config')
    then failed UNKNOWN (json.dumps' TypeError). GetData sends the
    configuration as JSON, so Initialize refuses what JSON cannot carry, in
    InitResponse as every failure, and the old configuration stays."""
    assert initialize(module, _write(tmp_path / 'good.yaml', b'speed: 1\n')).success
    bad = _write(tmp_path / 'bad.yaml', content)
    answer = initialize(module, bad)
    assert not answer.success
    assert answer.message.startswith(f'config file {str(bad)!r} cannot be sent as JSON'), answer.message
    assert message in answer.message, answer.message
    assert ('quote' in answer.message) == ('datetime' in message), answer.message
    data = module.call_method('GetData', pb.DataRequest(key='config'))
    assert json.loads(data.result) == {'speed': 1}
    assert execute(module, 'ping').result == 'pong'


def test_initialize_takes_keys_of_mixed_types_and_get_data_sends_them_as_json_text(
        module: SyncIPCHandler, tmp_path: Path) -> None:
    """Audit: ``{1: a, b: c}`` loaded, then GetData('config') failed UNKNOWN
    (sort_keys cannot order 1 and 'b'). A key of a number, true/false or
    null is JSON text, as json.dumps writes it, whatever the other keys are."""
    config = _write(tmp_path / 'mixed.yaml', b'joints: {1: a, b: c}\ntrue: 2\n~: 3\n0.5: 4\n')
    answer = initialize(module, config)
    assert answer.success, answer.message
    data = module.call_method('GetData', pb.DataRequest(key='config'))
    assert data.content_type == 'application/json'
    assert json.loads(data.result) == {'joints': {'1': 'a', 'b': 'c'}, 'true': 2, 'null': 3, '0.5': 4}



@pytest.mark.parametrize('content, keys', [
    (b'joints: {1: a, true: b}\n', 'the keys 1 and true'),
    (b'0: a\nfalse: b\n', 'the keys 0 and false'),
    (b'limits:\n  1: a\n  1.0: b\n', 'the keys 1 and 1.0'),
], ids=['int-bool', 'top-level', 'int-float'])
def test_initialize_refuses_two_keys_a_python_dict_takes_for_one(module: SyncIPCHandler, tmp_path: Path,
                                                                  content: bytes, keys: str) -> None:
    # Keys of their own in YAML and as JSON text ("1", "true"), one in a dict: the
    # configuration loaded with one key holding the other's value, the first value lost.
    assert initialize(module, _write(tmp_path / 'good.yaml', b'speed: 1\n')).success
    answer = initialize(module, _write(tmp_path / 'clash.yaml', content))
    assert not answer.success and keys in answer.message, answer.message
    assert json.loads(module.call_method('GetData', pb.DataRequest(key='config')).result) == {'speed': 1}


@pytest.mark.parametrize('lane', LANES)
def test_a_data_provider_returning_what_json_cannot_carry_is_internal_naming_key_and_type(
        start_server, socket_path: Path, lane: str) -> None:
    """Audit: a provider returning a date answered UNKNOWN with a bare
    TypeError. It is the server's bug: INTERNAL, naming the data item, where
    in its value and what; the server serves on."""
    start_server(socket_path, script='command_server.py').wait_serving(ttrpc=True)
    with SyncIPCHandler(socket_path, pb_grpc.ModuleServiceStub, lane=lane, timeout=10) as client:
        with pytest.raises(IPCRemoteError) as error:
            client.call_method('GetData', pb.DataRequest(key='calibration'))
        assert error.value.code is grpc.StatusCode.INTERNAL
        assert error.value.details == ("the provider of data item 'calibration' returned what JSON cannot "
                                       'carry: joints[0].since is a datetime.date (2024-01-01)')
        mixed = client.call_method('GetData', pb.DataRequest(key='by_number'))
        assert json.loads(mixed.result) == {'1': 'a', 'b': 'c'}
        # A provider that raises: UNKNOWN, as gRPC ends any handler that raised (README).
        with pytest.raises(IPCRemoteError) as error:
            client.call_method('GetData', pb.DataRequest(key='offline'))
        assert (error.value.code, error.value.details) == (
            grpc.StatusCode.UNKNOWN, "Unexpected <class 'RuntimeError'>: sensor offline")
        assert execute(client, 'ping').result == 'pong'
        assert client.lane_in_use == lane


@pytest.mark.parametrize('make_path, message', [
    (lambda tmp: '', 'config_path is empty'),
    (lambda tmp: 'relative/module.yaml', 'is relative'),
    (lambda tmp: tmp / 'missing.yaml', 'does not exist'),
    (lambda tmp: tmp, 'is a directory'),
    (lambda tmp: _write(tmp / 'bad.yaml', b'key: [unclosed'), 'not valid YAML'),
    (lambda tmp: _write(tmp / 'bad.json', b'{"a": '), 'not valid JSON'),
    (lambda tmp: _write(tmp / 'list.yaml', b'- a\n- b\n'), 'must hold a mapping'),
    (lambda tmp: _write(tmp / 'binary.yaml', b'\xff\xfe\x00'), 'not UTF-8'),
])
def test_initialize_failures_are_reported_not_raised(module: SyncIPCHandler, tmp_path: Path,
                                                     make_path, message: str) -> None:
    answer = initialize(module, make_path(tmp_path))
    assert not answer.success
    assert message in answer.message
    assert execute(module, 'ping').result == 'pong'


def _outside(tmp: Path) -> Path:
    """A root-only file outside the configuration directory."""
    secret = tmp.parent / f'{tmp.name}-secret.yaml'
    secret.write_text('password: hunter2\n')
    secret.chmod(0o600)
    return secret


def _symlink_out(tmp: Path) -> Path:
    link = tmp / 'innocent.yaml'
    link.symlink_to(_outside(tmp))
    return link


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / 'pipe.yaml')
    return tmp / 'pipe.yaml'


def _device(tmp: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip('needs root to make a device node')
    os.mknod(tmp / 'zero.yaml', stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    return tmp / 'zero.yaml'


@pytest.mark.parametrize('make_path, message', [
    (_outside, 'is not inside an allowed configuration directory'),
    (_symlink_out, 'resolves to'),
    (lambda tmp: Path('/dev/zero'), 'is not inside an allowed configuration directory'),
    (_fifo, 'is not a regular file'),
    (_device, 'is not a regular file'),
    (lambda tmp: _write(tmp / 'big.yaml', b'#' * (1024 * 1024 + 1)), 'more than the 1048576 allowed'),
], ids=['outside', 'symlink-outside', 'dev-zero', 'fifo', 'device', 'oversized'])
def test_initialize_reads_only_module_configuration(module: SyncIPCHandler, server: ServerProcess,
                                                    tmp_path: Path, make_path, message: str) -> None:
    """Issue 15: Initialize read any path for its caller (a root-only file,
    /dev/zero until the server had 3 GB, a FIFO that parked worker threads
    forever). Each is refused at once, naming the rule; the server is unmoved."""
    before = _rss_kb(server.pid)
    answer = initialize(module, make_path(tmp_path))
    assert not answer.success
    assert message in answer.message and 'refused' in answer.message
    assert 'hunter2' not in module.call_method('GetData', pb.DataRequest(key='config')).result.decode()
    assert _rss_kb(server.pid) - before < 16 * 1024
    good = _write(tmp_path / 'good.yaml', b'speed: 1\n')
    assert initialize(module, good).success
    assert execute(module, 'ping').result == 'pong'


def test_without_a_configuration_directory_initialize_says_how_to_allow_one(start_server,
                                                                            socket_path: Path,
                                                                            tmp_path: Path) -> None:
    start_server(socket_path)  # no --config-dir: the test module is not installed anywhere
    with SyncIPCHandler(socket_path, pb_grpc.ModuleServiceStub) as client:
        answer = initialize(client, _write(tmp_path / 'module.yaml', b'a: 1\n'))
    assert not answer.success
    assert 'no configuration directory is allowed (ModuleService(config_dirs=[...])' in answer.message


def test_config_dirs_and_size_are_checked() -> None:
    with pytest.raises(ValueError, match='max_config_bytes must be an int >= 1'):
        ModuleService('unit', max_config_bytes=0)
    assert ModuleService('unit', config_dirs='/etc/../etc').config_dirs == (Path('/etc'),)


def _rss_kb(pid: int) -> int:
    status = Path(f'/proc/{pid}/status').read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith('VmRSS:'))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_get_data_unknown_key_is_not_found_naming_the_key(module: SyncIPCHandler) -> None:
    with pytest.raises(IPCRemoteError) as error:
        module.call_method('GetData', pb.DataRequest(key='nope'))
    assert error.value.code is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in error.value.details and 'status' in error.value.details


# -- subclassing, in-process ---------------------------------------------------------

class ArmModule(ModuleService):
    def __init__(self, config_dir: Path | None = None) -> None:
        super().__init__('arm', config_dirs=None if config_dir is None else [config_dir])
        self.homed = False
        self.applied: dict = {}

    @command('home')
    def home(self, parameters: dict[str, str]) -> str:  # def: runs in a worker thread
        self.homed = True
        return f"homed at speed {parameters.get('speed', '1.0')}"

    @command()
    async def move(self, parameters: dict[str, str]) -> str:
        if not self.homed:
            raise CommandError('home first')
        return f"moved to {float(parameters['x']):.1f}"

    @command('explode')
    def explode(self, parameters: dict[str, str]) -> str:
        raise RuntimeError('boom')

    @command('quit')
    def quit(self, parameters: dict[str, str]) -> str:
        sys.exit(0)  # would end the server's event loop if it left the call

    @command('interrupt')
    async def interrupt(self, parameters: dict[str, str]) -> str:
        raise KeyboardInterrupt

    async def on_initialize(self, config: dict) -> None:
        if 'fail' in config:
            raise RuntimeError('refused')
        if 'exit' in config:
            sys.exit(5)
        self.applied = config


@pytest.mark.asyncio
async def test_subclass_commands_registry_and_status_codes(socket_path: Path) -> None:
    arm = ArmModule()
    arm.register_command('echo', lambda parameters: parameters['text'])
    async with IPCServer(socket_path, servicers=[arm]), \
            IPCHandler(socket_path, pb_grpc.ModuleServiceStub) as ipc:
        async def run(name: str, **parameters: str) -> tuple[int, str]:
            answer = await ipc.call_method('ExecuteCommand',
                                           pb.CommandRequest(command=name, parameters=parameters))
            return answer.status_code, answer.result

        assert await run('move', x='1') == (grpc.StatusCode.FAILED_PRECONDITION.value[0], 'home first')
        assert await run('home', speed='0.2') == (0, 'homed at speed 0.2')
        assert await run('move', x='2.25') == (0, 'moved to 2.2')
        code, result = await run('move', x='far')
        assert code == INVALID_ARGUMENT and 'could not convert' in result
        # A parameter the request lacks is the caller's mistake, named, in
        # async (move) and def (echo) handlers alike.
        assert await run('move') == (INVALID_ARGUMENT, "move: missing parameter 'x' (given: none)")
        assert await run('echo', txt='hi') == (INVALID_ARGUMENT, "echo: missing parameter 'text' (given: txt)")
        code, result = await run('echo', **{f'p{index:02}': '' for index in range(30)})
        first = ', '.join(f'p{index:02}' for index in range(20))
        assert result == f"echo: missing parameter 'text' (given: {first} and 10 more)"
        code, result = await run('explode')
        assert code == INTERNAL and 'boom' in result
        # An exit is a failure of that command like any other; the server serves on.
        assert await run('quit') == (INTERNAL, 'quit failed: SystemExit(0)')
        assert await run('interrupt') == (INTERNAL, 'interrupt failed: KeyboardInterrupt()')
        assert await run('echo', text='hi') == (0, 'hi')
        assert set(arm.commands) == {'echo', 'explode', 'home', 'interrupt', 'move', 'ping', 'quit', 'status'}


@pytest.mark.asyncio
async def test_failing_on_initialize_keeps_the_old_config(socket_path: Path, tmp_path: Path) -> None:
    good, bad, exits = tmp_path / 'good.yaml', tmp_path / 'bad.yaml', tmp_path / 'exits.yaml'
    good.write_text('a: 1\n')
    bad.write_text('fail: true\n')
    exits.write_text('exit: true\n')
    arm = ArmModule(tmp_path)
    async with IPCServer(socket_path, servicers=[arm]), \
            IPCHandler(socket_path, pb_grpc.ModuleServiceStub) as ipc:
        assert (await ipc.call_method('Initialize', pb.InitRequest(config_path=str(good)))).success
        answer = await ipc.call_method('Initialize', pb.InitRequest(config_path=str(bad)))
        exited = await ipc.call_method('Initialize', pb.InitRequest(config_path=str(exits)))
    assert not answer.success and 'refused' in answer.message
    assert not exited.success and exited.message == 'on_initialize failed: SystemExit(5)'
    assert arm.config == {'a': 1} and arm.applied == {'a': 1}



class DefInitModule(ModuleService):
    """A module whose on_initialize is a plain def, as its commands may be."""

    def __init__(self, config_dir: Path) -> None:
        super().__init__('arm', config_dirs=[config_dir])
        self.ran_in: list[str] = []

    def on_initialize(self, config: dict) -> None:  # (a def where the base class has an async def)
        self.ran_in.append(threading.current_thread().name)
        if 'fail' in config:
            raise ValueError('refused')


@pytest.mark.asyncio
async def test_a_def_on_initialize_runs_in_a_worker_thread_and_its_config_is_kept(socket_path: Path,
                                                                                 tmp_path: Path) -> None:
    # It was awaited: it ran and applied the configuration, then Initialize answered
    # "on_initialize failed: TypeError(\"object NoneType can't be used in 'await' expression\")"
    # and kept the old one.
    good, bad = tmp_path / 'good.yaml', tmp_path / 'bad.yaml'
    good.write_text('a: 1\n')
    bad.write_text('fail: true\n')
    arm = DefInitModule(tmp_path)
    async with IPCServer(socket_path, servicers=[arm]), \
            IPCHandler(socket_path, pb_grpc.ModuleServiceStub) as ipc:
        loaded = await ipc.call_method('Initialize', pb.InitRequest(config_path=str(good)))
        refused = await ipc.call_method('Initialize', pb.InitRequest(config_path=str(bad)))
    assert loaded.success, loaded.message
    assert not refused.success and refused.message == 'refused'
    assert arm.config == {'a': 1}
    # Both ran, neither on the server's event loop (this test's thread).
    assert len(arm.ran_in) == 2 and threading.current_thread().name not in arm.ran_in

@pytest.mark.asyncio
async def test_registered_data_items(socket_path: Path) -> None:
    service = ModuleService('unit')
    service.register_data('raw', lambda: b'\x00\x01')
    service.register_data('text', lambda: 'plain')

    async def joints() -> list:
        await asyncio.sleep(0)
        return [1, 2]
    service.register_data('joints', joints)
    async with IPCServer(socket_path, servicers=[service]), \
            IPCHandler(socket_path, pb_grpc.ModuleServiceStub) as ipc:
        async def get(key: str) -> tuple[bytes, str]:
            data = await ipc.call_method('GetData', pb.DataRequest(key=key))
            return data.result, data.content_type
        assert await get('raw') == (b'\x00\x01', 'application/octet-stream')
        assert await get('text') == (b'plain', 'text/plain')
        assert await get('joints') == (b'[1, 2]', 'application/json')



@pytest.mark.asyncio
async def test_failing_data_items_of_many_keys_are_one_kind_of_log_record(socket_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Audit: the log limit's kind of a provider's failure was the key a caller
    asks for, ``('GetData', key)``: 276 keys filled the limit's table of kinds
    (256), and every other kind of record then shared one limit, its first
    held back. Now one kind: the first failure logged, naming its key, the
    others told by number when the server stops; the table grows by one."""
    from vyra_base_ipc import _log_limit

    keys = [f'item{index}' for index in range(_log_limit.MAX_KINDS + 20)]
    service = ModuleService('many')
    for key in keys:
        service.register_data(key, lambda: {'since': datetime.date(2024, 1, 1)})
    kinds = len(_log_limit._kinds)
    async with IPCServer(socket_path, servicers=[service]), \
            IPCHandler(socket_path, pb_grpc.ModuleServiceStub, timeout=10) as ipc:
        for key in keys:
            with pytest.raises(IPCRemoteError) as error:
                await ipc.call_method('GetData', pb.DataRequest(key=key))
            assert error.value.code is grpc.StatusCode.INTERNAL
        assert len(_log_limit._kinds) <= kinds + 1
        # Another kind of record, afterwards: its first is logged at once.
        assert _log_limit.log_limited(logging.getLogger('test_module_service'), logging.ERROR, 'another kind',
                                      'another kind')
    failed = [record.getMessage() for record in caplog.records if record.name == 'vyra_base_ipc.module_service']
    assert len(failed) == 2, failed
    assert failed[0].startswith("GetData: the provider of data item 'item0' returned what JSON cannot carry"), failed
    assert failed[1].startswith(f"GetData: the provider of data item '{keys[-1]}' returned"), failed
    assert f'[{len(keys) - 2} more like this in the last' in failed[1], failed

@pytest.mark.asyncio
async def test_one_servicer_on_two_servers_serves_on_when_the_other_stops(socket_path: Path) -> None:
    """As grpc allows: one servicer on two servers. Its def commands ran in the
    threads of the server started last, shut down when that one stopped: the
    other answered its def commands and data items "cannot schedule new futures
    after shutdown"."""
    service = ModuleService('twice')
    service.register_command('echo', lambda parameters: parameters['text'])
    service.register_data('text', lambda: 'plain')
    first = IPCServer(socket_path, servicers=[service])
    second = IPCServer(socket_path.with_name('second.sock'), servicers=[service])
    async with first, second:
        await second.stop()
        async with IPCHandler(first.socket_path, pb_grpc.ModuleServiceStub, timeout=10) as ipc:
            answer = await ipc.call_method('ExecuteCommand',
                                           pb.CommandRequest(command='echo', parameters={'text': 'hi'}))
            data = await ipc.call_method('GetData', pb.DataRequest(key='text'))
    assert (answer.status_code, answer.result, data.result) == (0, 'hi', b'plain')


@pytest.mark.parametrize('call, error', [
    (lambda s: s.register_command('', lambda p: ''), ValueError),
    (lambda s: s.register_command('x', 'not callable'), TypeError),
    (lambda s: s.register_data('', lambda: b''), ValueError),
    (lambda s: ModuleService('Bad Name'), ValueError),
])
def test_registry_misuse_is_a_clear_error(call, error) -> None:
    with pytest.raises(error):
        call(ModuleService('unit'))


#: As a member of the socket group: one ttrpc Initialize request for argv[2]
#: on the fast lane argv[1]; prints the response frame's data as hex.
INITIALIZE_AS_MEMBER = r"""
import socket, struct, sys
def field(number, value):
    return bytes([number << 3 | 2, len(value)]) + value
payload = field(1, sys.argv[2].encode())
request = field(1, b'vyra.ipc.ModuleService') + field(2, b'Initialize') + field(3, payload) \
    + bytes([4 << 3, 0x80, 0x94, 0xeb, 0xdc, 0x03])  # timeout_nano: 1e9
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
s.sendall(struct.pack('>IIBB', len(request), 1, 1, 0) + request)
data = b''
while len(data) < 10 or len(data) < 10 + struct.unpack('>I', data[:4])[0]:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data[10:].hex())
"""


def test_a_socket_group_member_cannot_read_a_root_only_file_through_initialize(
        start_server, open_dir: Path, tmp_path: Path) -> None:
    """Issue 15: a member of the socket group, who cannot read a root-only
    file, got its contents through Initialize + GetData('config')."""
    if os.geteuid() != 0 or shutil.which('setpriv') is None:
        pytest.skip('needs root and setpriv to act as another user')
    secret = open_dir / 'secret.yaml'
    secret.write_text('password: hunter2\n')
    secret.chmod(0o600)
    config_dir = tmp_path / 'config'
    config_dir.mkdir()
    start_server(open_dir / 'g_ipc.sock', '--socket-group', 'nogroup', '--config-dir', str(config_dir))
    member = subprocess.run(
        ['setpriv', f'--reuid={OTHER_UID}', f'--regid={NOBODY}', '--clear-groups', '/usr/bin/python3', '-c',
         INITIALIZE_AS_MEMBER, str(open_dir / 'g_ipc.ttrpc.sock'), str(secret)],
        capture_output=True, text=True, timeout=60, env={'PATH': '/usr/bin:/bin'})
    assert member.returncode == 0, member.stderr
    response = ttrpc_pb2.Response.FromString(bytes.fromhex(member.stdout.strip()))
    assert response.status.code == 0  # the call itself is allowed...
    answer = pb.InitResponse.FromString(response.payload)
    assert not answer.success  # ...the file is not
    assert 'is not inside an allowed configuration directory' in answer.message
    assert 'hunter2' not in answer.message
