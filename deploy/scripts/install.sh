#!/bin/sh
# The image's install steps, also run on the host: `make` installs the runtime dependencies with
# `install.sh deps` and tests/e2e/test_deploy.py builds, installs and starts the app wheel with it.
#
#   install.sh deps        the runtime dependencies from the lock, with their hashes checked. With
#                          TORCH_INDEX_URL set (the cpu image), torch and torchvision come from that index
#                          instead, at the lock's versions, and the CUDA libraries are left out.
#   install.sh wheel DIR   build TTAServe's wheel from the source tree here into DIR
#   install.sh app DIR     install the wheel(s) in DIR, without dependencies (deps put them there)
#   install.sh check [cpu] exit 1 unless the installed distributions are the lock's versions (cpu: with
#                          torch and torchvision a CPU build of them, and no CUDA library)
#
# PYTHON is the interpreter to install into (default: python); LOCK the lock file
# (default: requirements/runtime.lock). Runs from the repository root (the image's /app).
set -eu

PYTHON=${PYTHON:-python}
LOCK=${LOCK:-requirements/runtime.lock}
HERE=$(dirname "$0")
pip() { "$PYTHON" -m pip "$@"; }

case "${1:-}" in
  deps)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      cpu_lock=$(mktemp)
      "$PYTHON" "$HERE/lock.py" cpu "$LOCK" >"$cpu_lock"
      # The CPU wheel index publishes no hashes we could lock here; the versions are the lock's.
      pip install --no-deps --index-url "$TORCH_INDEX_URL" \
        "$("$PYTHON" "$HERE/lock.py" pin "$LOCK" torch)" "$("$PYTHON" "$HERE/lock.py" pin "$LOCK" torchvision)"
      pip install --no-deps --require-hashes -r "$cpu_lock"
      rm -f "$cpu_lock"
    else
      pip install --no-deps --require-hashes -r "$LOCK"
    fi
    pip check  # the lock is complete: every installed distribution's requirements are met
    ;;
  wheel)
    [ -n "${2:-}" ] || { echo "usage: install.sh wheel DIR" >&2; exit 2; }
    # The build backend is the lock's setuptools (torch needs it too), hash-checked; no build isolation.
    backend=$(mktemp)
    "$PYTHON" "$HERE/lock.py" only "$LOCK" setuptools >"$backend"
    pip install --no-deps --require-hashes -r "$backend"
    rm -f "$backend"
    # setuptools builds in ./build and never prunes it: a module deleted since would ride along in the wheel.
    rm -rf build
    pip wheel --no-deps --no-build-isolation --wheel-dir "$2" .
    rm -rf build
    ;;
  app)
    [ -n "${2:-}" ] || { echo "usage: install.sh app DIR" >&2; exit 2; }
    pip install --no-deps --no-index "$2"/ttaserve-*.whl
    ;;
  check)
    if [ "${2:-}" = cpu ]; then
      "$PYTHON" "$HERE/lock.py" check "$LOCK" --cpu
    else
      "$PYTHON" "$HERE/lock.py" check "$LOCK"
    fi
    ;;
  *)
    echo "usage: install.sh deps|wheel DIR|app DIR|check [cpu]" >&2
    exit 2
    ;;
esac
