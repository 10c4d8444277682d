"""The verbs of ``ros2 ipc``: each runs the ``vyra-ipc`` verb of its name
(:data:`vyra_base_ipc.cli.VERBS`) with the same arguments, output and exit
status. Imported only by ros2cli."""

from __future__ import annotations

import argparse
from typing import Any

from ros2cli.verb import VerbExtension as _Ros2VerbExtension

from .._app import VERBS, run


class VerbExtension(_Ros2VerbExtension):
    """A verb of ``ros2 ipc`` (extension point ``ros2ipc.verb``): the
    ``vyra-ipc`` verb named :attr:`VERB`."""

    #: The name of the ``vyra-ipc`` verb it runs.
    VERB = ''

    def add_arguments(self, parser: argparse.ArgumentParser, cli_name: str) -> None:
        """The arguments, description and epilog of the ``vyra-ipc`` verb."""
        self._prog = cli_name
        VERBS[self.VERB].describe(parser)

    def main(self, *, args: Any) -> int:
        """Run the verb; errors become one line on stderr and the exit status."""
        return run(VERBS[self.VERB], args, getattr(self, '_prog', f'ros2 ipc {self.VERB}'))


class ListVerb(VerbExtension):
    """IPC servers on this machine: state, pid, uid, sockets, services."""

    VERB = 'list'


class DescribeVerb(VerbExtension):
    """Services and methods of a server, or one method or message."""

    VERB = 'describe'


class CallVerb(VerbExtension):
    """Call a method: the request as JSON or YAML, the answer as JSON."""

    VERB = 'call'


class HealthVerb(VerbExtension):
    """The grpc.health.v1 status of a server or one of its services."""

    VERB = 'health'


class PingVerb(VerbExtension):
    """Round trips of health checks: p50, p99, max and a histogram."""

    VERB = 'ping'


class StatsVerb(VerbExtension):
    """The server's metrics: calls, errors, latency; connections, bytes."""

    VERB = 'stats'
