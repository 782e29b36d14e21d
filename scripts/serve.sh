#!/usr/bin/env bash
# Install Dockyard into ./.venv and run it on the embedded default: filesystem storage in
# ./data, port 5000, no authentication. Extra arguments go to `dockyard serve`
# (e.g. scripts/serve.sh /etc/docker/registry/config.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -e .
exec .venv/bin/dockyard serve "$@"
