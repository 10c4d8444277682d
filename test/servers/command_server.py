"""A server whose ModuleService has commands that read their parameters.

``move`` reads ``parameters['x']``; ``broken`` fails with a KeyError of its
own (not of its parameters). ``busy`` raises a CommandError with a status
number (14, UNAVAILABLE); ``jammed`` (a ``def``) and ``unpowered`` misuse
CommandError (OK, a status name as text). Data items: ``calibration`` (a bug of the
server's: a date, which JSON cannot carry), ``by_number`` (keys of two
types), ``gate`` (a ``def`` provider that blocks until the command
``open_gate``; ``gate_state`` says whether it waits). Prints nothing; the
tests wait for the sockets.

Usage: command_server.py SOCKET_PATH
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading

import grpc

from vyra_base_ipc import CommandError, IPCServer, ModuleService, command, run

#: Seconds the ``gate`` provider waits for ``open_gate`` at most.
GATE_WAIT = 60.0


class ArmModule(ModuleService):
    def __init__(self, module_name: str) -> None:
        super().__init__(module_name)
        self.register_data('calibration', lambda: {'joints': [{'since': datetime.date(2024, 1, 1)}]})
        self.register_data('by_number', lambda: {1: 'a', 'b': 'c'})
        self.register_data('offline', self.offline)
        self.gate_waiting = threading.Event()
        self.gate_opened = threading.Event()
        self.register_data('gate', self.gate)

    def offline(self) -> str:
        raise RuntimeError('sensor offline')

    def gate(self) -> str:
        """Data item ``gate``: blocks, as a provider in slow I/O would, until ``open_gate``."""
        self.gate_waiting.set()
        return 'opened' if self.gate_opened.wait(GATE_WAIT) else f'not opened within {GATE_WAIT:g} s'

    @command()
    async def gate_state(self, parameters: dict[str, str]) -> str:
        return 'waiting' if self.gate_waiting.is_set() else 'idle'

    @command()
    async def open_gate(self, parameters: dict[str, str]) -> str:
        self.gate_opened.set()
        return 'opened'

    @command()
    async def move(self, parameters: dict[str, str]) -> str:
        return f'moved to {float(parameters["x"])}'

    @command()
    def broken(self, parameters: dict[str, str]) -> str:
        table: dict[str, str] = {}
        return table['calibration']  # a bug of the handler, not the caller's mistake

    @command()
    async def busy(self, parameters: dict[str, str]) -> str:
        raise CommandError('homing, try later', 14)  # a google.rpc.Code number: UNAVAILABLE

    @command()
    def jammed(self, parameters: dict[str, str]) -> str:
        raise CommandError('gripper jammed', grpc.StatusCode.OK)  # a bug: a failure cannot be OK

    @command()
    async def unpowered(self, parameters: dict[str, str]) -> str:
        raise CommandError('no power', 'UNAVAILABLE')  # type: ignore[arg-type]  # a bug: not a status


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run(IPCServer(sys.argv[1], servicers=[ArmModule('arm')]).serve())


if __name__ == '__main__':
    main()
