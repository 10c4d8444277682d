"""Demo backend process: serves BackendService and ModuleService until
SIGINT/SIGTERM, then stops within the grace period and removes its socket."""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from vyra_base_ipc import DEFAULT_GRACE_PERIOD, IPCServer, ModuleService, run
from vyra_base_ipc.demo.backend_service import BackendService


def main(args: Sequence[str] | None = None) -> int:
    """The ``demo_backend`` command (``args``: default ``sys.argv[1:]``); the
    exit status, 1 if the socket cannot be served."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--socket-path', help='socket to serve on (default: from VYRA_IPC_SOCKET '
                        'or the module name)')
    parser.add_argument('--module-name', default=None, help='module name (default: from '
                        'VYRA_MODULE_NAME/MODULE_NAME, else "demo")')
    parser.add_argument('--grace-period', type=float, default=DEFAULT_GRACE_PERIOD)
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format='[backend] %(message)s')

    module_name = options.module_name
    if options.socket_path is None and module_name is None:
        module_name = 'demo'
    server = IPCServer(options.socket_path, module_name=module_name,
                       servicers=[BackendService(), ModuleService(module_name or 'demo')],
                       grace_period=options.grace_period)
    try:
        run(server.serve())
    except OSError as error:  # socket in use, path unusable: the message names the path
        logging.error('%s', error)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
