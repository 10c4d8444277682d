#!/usr/bin/env bash
# Sets everything up (see bootstrap.sh) and runs the demo module.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# PYTHONSAFEPATH: run the installed package, not the source folder we stand in.
PYTHONSAFEPATH=1 exec python -m vyra_base_ipc.demo "$@"
