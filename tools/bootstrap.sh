# Sourced by tools/demo.sh and tools/test.sh: creates the virtual environment
# .venv (with everything in requirements.txt), builds the package with colcon
# into install/, and sources it, keeping .venv on AMENT_PREFIX_PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
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
