"""``python -m vyra_base_ipc``: the ``vyra-ipc`` tool (see :mod:`vyra_base_ipc.cli`)."""

from .cli import main

raise SystemExit(main())
