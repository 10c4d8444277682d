"""Run the demo module the ROS 2 way: ``python -m vyra_base_ipc.demo``.

Starts what ``ros2 launch vyra_base_ipc module_ipc.launch.py module_name:=demo``
starts on a ROS 2 installation (the launch tool is not needed here):

1. the module's ROS 2 node (``demo_module_node``, offering the ``callable``
   std_srvs/Trigger service);
2. the ``ipc_server`` node with ``--params-file config/ipc_server.yaml``,
   ``module_name`` and the demo servicers (``DemoModuleService``, whose
   ``callable`` command calls the ROS 2 service, and ``BackendService``);
3. a frontend process that calls through IPCHandler, prints the answers,
   fires concurrent IPC -> ROS 2 calls, and prints one latency line for the
   same kind of request over IPC and over a ROS 2 service.

Then it stops both nodes with SIGTERM and checks that they exited 0 and left
no socket file; the exit status is non-zero otherwise.

The demo talks only to the server it starts: by default its sockets are in a
private temporary directory (so demos run side by side and never reach
another module's ``demo`` server); with ``--socket-path`` it refuses to start
when a server already answers there. Every process gets
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private ``ROS_DOMAIN_ID`` and
``ROS_HOME`` in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Sequence

from vyra_base_ipc._socket_file import is_listening
from vyra_base_ipc.address import default_socket_path, default_ttrpc_socket_path, resolve_socket_path

PACKAGE = 'vyra_base_ipc'
SERVICERS = ('vyra_base_ipc.demo.callable_service:DemoModuleService',
             'vyra_base_ipc.demo.backend_service:BackendService')
#: How long a node may take to exit after SIGTERM (grace period 5 s + 1 s,
#: plus start-up slack on a loaded machine).
STOP_TIMEOUT = 10.0
#: Seconds a child that did not stop gets to print its stacks after SIGABRT.
STACKS_TIMEOUT = 5.0


def find_config(name: str) -> Path:
    """The installed ``share/vyra_base_ipc/config/<name>``, else the source tree's.

    :raises FileNotFoundError: neither exists.
    """
    try:
        from ament_index_python.packages import get_package_share_directory
        installed = Path(get_package_share_directory(PACKAGE)) / 'config' / name
        if installed.is_file():
            return installed
    except (ImportError, LookupError, OSError):
        # Not installed, or AMENT_PREFIX_PATH unset (OSError): use the source tree.
        pass
    source = Path(__file__).resolve().parents[2] / 'config' / name
    if source.is_file():
        return source
    raise FileNotFoundError(f'config/{name} is neither installed (share/{PACKAGE}) nor in {source.parent}')


def demo_environment(ros_home: Path, domain_id: int) -> dict[str, str]:
    """This process's environment, confined to this machine and a private domain."""
    env = dict(os.environ)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.pop('ROS_STATIC_PEERS', None)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env['ROS_HOME'] = str(ros_home)
    env['PYTHONUNBUFFERED'] = '1'
    # A child that does not stop in time is sent SIGABRT: faulthandler then
    # prints where each of its threads was (Child.stop).
    env['PYTHONFAULTHANDLER'] = '1'
    # The parameters decide the socket, not leftovers in the environment.
    env.pop('VYRA_IPC_SOCKET', None)
    return env


def entry_point(module: str) -> list[str]:
    """The command of a console script of this package, run by this interpreter
    (so the demo uses the same installation whatever is on PATH)."""
    return [sys.executable, '-c', f'import sys; from {module} import main; sys.exit(main())']


class Child:
    """A child process whose output is printed with a ``[name]`` prefix."""

    def __init__(self, name: str, command: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self._terminated = False
        self.popen = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert self.popen.stdout is not None
        self._printer = threading.Thread(target=self._print, args=(self.popen.stdout,),
                                         name=f'output-{name}', daemon=True)
        self._printer.start()

    def _print(self, stream: IO[str]) -> None:
        for line in stream:
            print(f'[{self.name}] {line}', end='', flush=True)

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code.

        :raises subprocess.TimeoutExpired: still running after ``timeout`` s.
        """
        code = self.popen.wait(timeout=timeout)
        self._printer.join(timeout=2)
        return code

    def terminate(self) -> None:
        """Send SIGTERM once (a second one is not part of a clean stop)."""
        if self.running() and not self._terminated:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """SIGTERM, then wait; if it does not exit in time, SIGABRT (with
        ``PYTHONFAULTHANDLER`` set, as :func:`demo_environment` sets it, the
        child prints the Python stack of each of its threads: where it hung),
        then SIGKILL. The exit code, or ``None`` if it had to be stopped so."""
        self.terminate()
        try:
            return self.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f'{self.name} did not exit within {STOP_TIMEOUT:g} s of SIGTERM; '
                  'SIGABRT: its threads follow', flush=True)
            self.popen.send_signal(signal.SIGABRT)
            try:
                self.popen.wait(timeout=STACKS_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            self._printer.join(timeout=2)
            return None


def wait_serving(server: Child, socket_path: Path, timeout: float) -> bool:
    """Whether a server answers on ``socket_path`` within ``timeout`` s; False
    at once if ``server`` exits first."""
    deadline = time.monotonic() + timeout
    while not is_listening(socket_path):
        if not server.running() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _private_socket(directory: Path, module_name: str) -> Path:
    """``<module_name>_ipc.sock`` in a new directory only we may enter."""
    sockets = directory / 'sockets'
    sockets.mkdir(mode=0o700)
    return resolve_socket_path(sockets / default_socket_path(module_name).name)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vyra_base_ipc.demo``, as the module docstring says; the
    exit status."""
    parser = argparse.ArgumentParser(description='Run the VYRA IPC demo module the ROS 2 way.')
    parser.add_argument('--module-name', default='demo')
    parser.add_argument('--socket-path', default='',
                        help='socket_path parameter (default: <module_name>_ipc.sock in a private '
                             'temporary directory)')
    parser.add_argument('--namespace', default='', help='ROS namespace of both nodes, e.g. /robot1')
    parser.add_argument('--callable-calls', type=int, default=20, metavar='N',
                        help='concurrent IPC calls that each call the ROS 2 service')
    parser.add_argument('--latency-calls', type=int, default=200, metavar='N',
                        help='calls over IPC and over ROS 2 for the latency line')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID (default: a random one of 100..232)')
    options = parser.parse_args(argv)

    config = find_config('ipc_server.yaml')
    with tempfile.TemporaryDirectory(prefix='vyra-demo-') as private:
        ros_home = Path(private) / 'ros_home'
        ros_home.mkdir()
        domain_id = random.randint(100, 232) if options.domain_id is None else options.domain_id
        env = demo_environment(ros_home, domain_id)
        try:
            socket_path = (resolve_socket_path(options.socket_path) if options.socket_path else
                           _private_socket(Path(private), options.module_name))
        except ValueError as error:
            print(f'demo: {error}', flush=True)
            return 2
        taken = [path for path in (socket_path, default_ttrpc_socket_path(socket_path))
                 if is_listening(path)]
        if taken:
            print(f'a server already answers on {taken[0]}: the demo talks only to the server it '
                  'starts; stop that server or choose another --socket-path', flush=True)
            return 1
        print(f'ROS_DOMAIN_ID={domain_id} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST '
              f'ROS_HOME={ros_home}', flush=True)
        print(f'parameters from {config}', flush=True)
        remap = ['-r', f'__ns:={options.namespace}'] if options.namespace else []
        ipc_args = ['--ros-args', *remap, '--params-file', str(config),
                    '-p', f'module_name:={options.module_name}',
                    '-p', f'servicers:={list(SERVICERS)!r}', '-p', f'socket_path:={socket_path}']
        return run(options, env, socket_path, ipc_args, remap)


def run(options: argparse.Namespace, env: dict[str, str], socket_path: Path,
        ipc_args: list[str], remap: list[str]) -> int:
    """Start the nodes and the frontend, stop the nodes, check how they
    ended; the exit status (0: everything as it should be)."""
    children: list[Child] = []
    frontend_code: int | None = None
    try:
        children.append(Child('demo_module_node', [
            *entry_point('vyra_base_ipc.demo.module_node'), '--ros-args', *remap,
            '-p', f'module_name:={options.module_name}'], env))
        ipc_server = Child('ipc_server', [*entry_point('vyra_base_ipc.node'), *ipc_args], env)
        children.append(ipc_server)
        if wait_serving(ipc_server, socket_path, timeout=30):
            frontend = Child('frontend', [
                sys.executable, '-m', 'vyra_base_ipc.demo.frontend',
                '--socket-path', str(socket_path),
                '--callable-calls', str(options.callable_calls),
                '--latency-calls', str(options.latency_calls),
                '--ros-namespace', options.namespace], env)
            children.append(frontend)
            frontend_code = frontend.wait(timeout=300)
        else:
            code = ipc_server.popen.poll()
            print(f'ipc_server did not serve {socket_path}'
                  + ('' if code is None else f' (it exited with {code})'), flush=True)
    except KeyboardInterrupt:
        print('interrupted', flush=True)
    finally:
        # Both nodes at once: they stop in parallel.
        for child in children:
            child.terminate()
        codes = {child.name: child.stop() for child in children}
    sockets = (socket_path, default_ttrpc_socket_path(socket_path))
    left = [path for path in sockets if path.exists()]
    print('stopped with SIGTERM: '
          + ', '.join(f'{name} exit code {code}' for name, code in codes.items())
          + '; ' + ', '.join(f'socket {path} {"still there" if path in left else "removed"}'
                             for path in sockets), flush=True)
    ok = frontend_code == 0 and not left and all(code == 0 for code in codes.values())
    print('demo ' + ('succeeded' if ok else 'FAILED'), flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    raise SystemExit(main())
