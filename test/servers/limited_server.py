"""echo_server.py under a low limit on open files (``VYRA_TEST_NOFILE``), for
the tests of a server that runs out of descriptors.

Usage: VYRA_TEST_NOFILE=N limited_server.py SOCKET_PATH [echo_server options]
"""

from __future__ import annotations

import os
from pathlib import Path
import resource
import runpy

limit = int(os.environ['VYRA_TEST_NOFILE'])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
runpy.run_path(str(Path(__file__).with_name('echo_server.py')), run_name='__main__')
