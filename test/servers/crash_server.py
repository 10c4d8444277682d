"""A ModuleService whose command ``record`` appends a line to the file named
by CRASH_LOG, then kills the process if that was the first line: a request
that ran on the server, and a server that died before answering.

Usage: crash_server.py SOCKET_PATH   (environment: CRASH_LOG=/path/to/file)
"""

from __future__ import annotations

import asyncio
import os
import sys

from vyra_base_ipc import IPCServer, ModuleService, command


class CrashingModule(ModuleService):
    @command('record')
    def record(self, parameters: dict[str, str]) -> str:
        with open(os.environ['CRASH_LOG'], 'a+') as log:
            log.write(f'{os.getpid()}\n')
            log.seek(0)
            lines = len(log.readlines())
        if lines == 1:
            os._exit(9)
        return f'recorded #{lines}'


if __name__ == '__main__':
    asyncio.run(IPCServer(sys.argv[1], servicers=[CrashingModule('crashy')]).serve())
