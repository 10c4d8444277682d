# Sourced by tools/demo.sh and tools/test.sh: creates the virtual environment
# .venv (with everything in requirements.txt), builds the package with colcon
# into install/, and sources it, keeping .venv on AMENT_PREFIX_PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# PYTHON: the interpreter .venv is made with (default python3), e.g.
# PYTHON=python3.12 tools/test.sh in a fresh clone to test on ROS 2 Kilted's
# Python. A .venv of another Python version is refused, not used instead.
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
elif [ -n "${PYTHON:-}" ] && [ "$(python_version "$PYTHON")" != "$(python_version .venv/bin/python)" ]; then
  echo "error: .venv has Python $(python_version .venv/bin/python), PYTHON=$PYTHON is" \
       "$(python_version "$PYTHON"): remove .venv, build and install first" >&2
  exit 2
fi
# colcon must not crawl the virtual environment.
touch .venv/COLCON_IGNORE
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

# shellcheck disable=SC1091
source .venv/bin/activate
# Generated code in the source folder too (git-ignored), so that tools run
# from the repository root, such as `python -m bench`, import a whole package.
python setup.py -q generate_protos
colcon build --base-paths "$ROOT" "$ROOT/examples" --build-base build --install-base install \
  --event-handlers console_direct-
set +u  # setup.bash reads unset variables
# shellcheck disable=SC1091
source install/setup.bash
set -u
# install/setup.bash leaves only the workspace on AMENT_PREFIX_PATH; the ROS 2
# packages from wheels are found through the virtual environment's prefix.
export AMENT_PREFIX_PATH="$AMENT_PREFIX_PATH:$VIRTUAL_ENV"
