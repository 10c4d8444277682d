#!/usr/bin/env bash
# Runs the whole test suite the ROS 2 way: colcon build, then colcon test
# against the installed tree, inside a private network namespace when this
# user may create one (DDS traffic then cannot leave loopback).
# Extra arguments go to pytest, e.g. tools/test.sh -m "not soak" -k socket
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

# The fast lane's interop test builds containerd's reference ttrpc client
# (Go, GOPATH mode, nothing downloaded): Debian ships both.
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/ttrpc ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing golang-go and golang-github-containerd-ttrpc-dev for the interop test" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      golang-go golang-github-containerd-ttrpc-dev >/dev/null
  else
    echo "note: no go / containerd ttrpc source and cannot install them: the interop test skips" >&2
  fi
fi

# One pytest-xdist worker per CPU, a test file to each at a time (most tests
# wait on real processes and deadlines, not on a CPU: the run takes half the
# time); arguments given after these win ("-n 0": one process).
# colcon takes --pytest-args values that look like options for its own
# unless they begin with a space (it strips it).
pytest_args=()
for arg in -n auto --dist loadfile "$@"; do
  pytest_args+=(" $arg")
done
run_tests() {  # (its arguments: pytest's)
  # PYTHONSAFEPATH: pytest runs in the source folder; import the installed tree.
  PYTHONSAFEPATH=1 colcon test --base-paths "$ROOT" "$ROOT/examples" --build-base build --install-base install \
    --return-code-on-test-failure --event-handlers console_direct+ \
    --pytest-args "$@"
}

status=0
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  export -f run_tests
  export ROOT
  # (An array does not pass through the environment: the arguments go as the shell's.)
  unshare -n bash -c 'ip link set lo up && run_tests "$@"' bash "${pytest_args[@]}" || status=$?
else
  echo "note: not root or no unshare: tests run in the host network namespace" \
       "(DDS is still limited to localhost by the test fixtures)" >&2
  run_tests "${pytest_args[@]}" || status=$?
fi
# The test runner's own summary lines: the example module's, then this
# package's, last.
for package in my_arm vyra_base_ipc; do
  grep -E '^=+ .*(passed|failed|error|no tests ran).* in [0-9.]+s' \
    "log/latest_test/$package/stdout_stderr.log" | tail -n 1 || true
done
exit "$status"
