#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run every tier.
#   Debian packages: the real clients and daemons the tests drive (installed while pip works).
#   Python: Dockyard and its test dependencies, in ./.venv.
# Extra arguments go to pytest instead (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  skopeo          # push/pull with containers/image
  podman          # another containers/image client, with its own login
  apache2-utils   # htpasswd -B, to check files made by Apache's tool
  docker.io       # a real docker engine (dockerd, containerd, runc, ctr)
  busybox-static  # the binary inside the offline test image
  docker-registry # registry:2 (distribution 2.8), the reference for interop tests
  procps          # pgrep, used by the server tests
  nginx           # the classic TLS front, with the shipped deploy/nginx config
  pebble          # Let's Encrypt's test ACME server
  docker-compose  # validates deploy/docker-compose.yml
  mmdebstrap      # a local Debian base image to build deploy/Dockerfile without Docker Hub
  wrk             # HTTP load for the benchmark's smoke run (bench/)
  curl            # the benchmark's streaming client
  radosgw         # Ceph RADOS Gateway: a real S3 server that checks signatures (tests/rgw/)
  ceph-mon        # its monitor (one, on loopback, no cephx)
  ceph-osd        # its object store (one in-memory memstore OSD)
  ceph-common     # ceph, radosgw-admin, monmaptool: the tools rgw-up.sh runs
  redis-server    # the shared cache of several instances; tests start their own on free ports
  chromium        # the web UI's tests (tests/browser/) drive it with Playwright, headless
)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_debian_packages() {
  local missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${missing[@]}"
  fi
  # Installing packages may start their services (registry:2 on port 5000, nginx on 80, redis
  # on 6379); the tests run their own instances on free ports.
  as_root sh -c 'command -v systemctl >/dev/null && systemctl stop docker-registry docker nginx redis-server 2>/dev/null || true'
}

# apt-get and pip at the same time: one waits on the network while the other unpacks.
apt_log=$(mktemp)
install_debian_packages >"$apt_log" 2>&1 &
apt_pid=$!

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if ! wait "$apt_pid"; then
  cat "$apt_log"
  echo "installing Debian packages failed" >&2
  exit 1
fi
tail -n 3 "$apt_log"
rm -f "$apt_log"

export PATH="$PWD/.venv/bin:$PATH"
ruff check src tests bench
ruff format --check src tests bench
if [ $# -gt 0 ]; then
  exec python -m pytest "$@"
fi
# Every tier (unit, api, e2e, interop, s3, browser; slow ones first), in parallel workers. The
# protocol's API tests run twice in it, the second time with every server on S3 (moto); the
# whole API suite runs so with `DOCKYARD_TEST_S3=moto pytest tests/api`.
# Twice as many workers as cores: many tests wait on daemons and clients rather than compute.
exec python -m pytest -n "$(( $(nproc) * 2 ))"
