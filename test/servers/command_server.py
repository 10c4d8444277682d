"""A server whose ModuleService has commands that read their parameters.

``move`` reads ``parameters['x']``; ``broken`` fails with a KeyError of its
own (not of its parameters). Data items: ``calibration`` (a bug of the
server's: a date, which JSON cannot carry), ``by_number`` (keys of two
types). Prints nothing; the tests wait for the sockets.

Usage: command_server.py SOCKET_PATH
"""

from __future__ import annotations

import datetime
import logging
import sys

from vyra_base_ipc import IPCServer, ModuleService, command, run


class ArmModule(ModuleService):
    def __init__(self, module_name: str) -> None:
        super().__init__(module_name)
        self.register_data('calibration', lambda: {'joints': [{'since': datetime.date(2024, 1, 1)}]})
        self.register_data('by_number', lambda: {1: 'a', 'b': 'c'})

    @command()
    async def move(self, parameters: dict[str, str]) -> str:
        return f'moved to {float(parameters["x"])}'

    @command()
    def broken(self, parameters: dict[str, str]) -> str:
        table: dict[str, str] = {}
        return table['calibration']  # a bug of the handler, not the caller's mistake


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run(IPCServer(sys.argv[1], servicers=[ArmModule('arm')]).serve())


if __name__ == '__main__':
    main()
