"""``ros2 ipc``: the ros2cli command whose verbs are the ``ros2ipc.verb``
extensions (:mod:`vyra_base_ipc.cli.ros2.verb`). Imported only by ros2cli."""

from __future__ import annotations

import argparse
from typing import Any

from ros2cli.command import CommandExtension, add_subparsers_on_demand


class IpcCommand(CommandExtension):
    """See and poke the IPC servers of VYRA modules (vyra_base_ipc)."""

    def add_arguments(self, parser: argparse.ArgumentParser, cli_name: str, *,
                      argv: list[str] | None = None) -> None:
        """Add the verbs (entry points ``ros2ipc.verb``) to ``ros2 ipc``."""
        self._subparser = parser
        add_subparsers_on_demand(parser, cli_name, '_verb', 'ros2ipc.verb', required=False, argv=argv)

    def main(self, *, parser: argparse.ArgumentParser, args: Any) -> int:
        """Run the verb given; without one, print the help."""
        if not hasattr(args, '_verb'):
            self._subparser.print_help()
            return 0
        return int(args._verb.main(args=args))
