"""``ros2 ipc <verb>``: ``vyra-ipc`` as a ros2cli command (entry point
``ros2cli.command``). Imported only by ros2cli; the package works without it."""

from __future__ import annotations

import argparse
from typing import Any

from ros2cli.command import CommandExtension

from ._app import build_parser, run


class IpcCommand(CommandExtension):
    """See and poke the IPC servers of VYRA modules (vyra_base_ipc)."""

    def add_arguments(self, parser: argparse.ArgumentParser, cli_name: str) -> None:
        """Add the verbs of ``vyra-ipc`` to ``ros2 ipc``."""
        self._parser = parser
        build_parser(parser, cli_name)

    def main(self, *, parser: argparse.ArgumentParser, args: Any) -> int:
        """Run the verb given."""
        return run(args, self._parser)
