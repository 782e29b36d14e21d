"""``/debug/health``: registry:2's health endpoint, usable by compose and load balancers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from harness import ServerFactory


@pytest.mark.slow
@pytest.mark.filesystem
def test_health_reports_storage(start_server: ServerFactory, tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    users.write_text("")  # auth on, no users: health still answers without credentials
    s = start_server(auth={"htpasswd": {"realm": "R", "path": str(users)}})
    r = requests.get(s.url + "/debug/health")
    assert r.status_code == 200 and r.json() == {}
    assert requests.get(s.v2("")).status_code == 401
    # break storage: the probe directory becomes a file, so writes there fail
    probe = s.root / "dockyard" / "health"
    shutil.rmtree(probe)
    probe.write_text("in the way")
    time.sleep(1.1)  # results are reused for a second
    r = requests.get(s.url + "/debug/health")
    assert r.status_code == 503
    assert list(r.json()) == ["storagedriver_filesystem"]
    probe.unlink()
    time.sleep(1.1)
    assert requests.get(s.url + "/debug/health").status_code == 200
