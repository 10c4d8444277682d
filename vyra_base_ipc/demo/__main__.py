"""Run the demo module: start the backend process, call it from a frontend
process, then stop the backend with SIGTERM and check it cleaned up."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from vyra_base_ipc import resolve_socket_path
from vyra_base_ipc.socket_file import is_listening


def main() -> int:
    env = dict(os.environ)
    env.setdefault('VYRA_MODULE_NAME', 'demo')
    socket_path = resolve_socket_path(environ=env)
    backend = subprocess.Popen([sys.executable, '-m', 'vyra_base_ipc.demo.backend'], env=env)
    try:
        deadline = time.monotonic() + 15
        while not is_listening(socket_path):
            if backend.poll() is not None:
                print(f'backend exited with {backend.returncode} before serving', file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f'backend did not serve {socket_path} within 15 s', file=sys.stderr)
                return 1
            time.sleep(0.05)
        frontend = subprocess.run([sys.executable, '-m', 'vyra_base_ipc.demo.frontend'], env=env)
    finally:
        backend.send_signal(signal.SIGTERM)
        try:
            backend.wait(timeout=10)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()
    left = Path(socket_path).exists()
    print(f'backend stopped on SIGTERM with exit code {backend.returncode}; '
          f'socket {"still there" if left else "removed"}')
    return 0 if frontend.returncode == 0 and backend.returncode == 0 and not left else 1


if __name__ == '__main__':
    raise SystemExit(main())
