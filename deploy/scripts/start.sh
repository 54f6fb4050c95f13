#!/bin/sh
# The image's start step (its CMD), also run on the host by tests/e2e/test_deploy.py: one server process
# (one per GPU, never --workers N), replacing this shell so it gets SIGTERM and drains.
set -eu

data=${TTA_DATA_DIR:-data}
if ! mkdir -p "$data" 2>/dev/null || [ ! -w "$data" ]; then
  # The usual cause in a container: a host directory bind-mounted on /data, owned by root.
  echo "start.sh: TTA_DATA_DIR=$data is not writable by uid $(id -u); on the host: chown -R $(id -u):$(id -g) DIR" \
    "(the directory mounted there), or use a named volume" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m server "$@"
