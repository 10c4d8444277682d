#!/usr/bin/env bash
# Sets everything up (see bootstrap.sh) and runs the demo module.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec python -m vyra_base_ipc.demo "$@"
