"""containerd pulls from Dockyard: an image pushed by skopeo is pulled by ``ctr`` (containerd's
own client, talking to the containerd that the session's docker engine runs), unpacked, and
its content matches what was pushed."""

from __future__ import annotations

import json
from pathlib import Path

from harness import ServerFactory, need_binaries
from harness.docker import Dockerd
from harness.images import build_busybox_image
from harness.skopeo import skopeo


def test_ctr_pulls_what_skopeo_pushed(
    dockerd: Dockerd, start_server: ServerFactory, tmp_path: Path
) -> None:
    need_binaries("ctr", "skopeo")
    server = start_server()
    image = build_busybox_image(tmp_path / "busybox.tar")
    ref = f"{server.host}/ctr/busybox:v1"
    pushed = tmp_path / "digest"
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--digestfile",
        str(pushed),
        f"docker-archive:{image.path}",
        f"docker://{ref}",
    )
    digest = pushed.read_text().strip()

    pulled = dockerd.ctr("images", "pull", "--plain-http", ref, timeout=120)
    assert digest in pulled.stdout or "done" in pulled.stdout, pulled.stdout
    listed = dockerd.ctr("images", "list", "--quiet").stdout.split()
    assert ref in listed, listed
    (info,) = [
        line.split()
        for line in dockerd.ctr("images", "list").stdout.splitlines()[1:]
        if line.startswith(ref)
    ]
    assert digest in info, info  # the manifest digest containerd resolved is the pushed one
    # containerd holds the config skopeo pushed (docker's image ID is its digest).
    config = dockerd.ctr("content", "get", image.image_id).stdout
    assert json.loads(config)["config"]["Cmd"] == ["/bin/cat", "/etc/hello.txt"]
    dockerd.ctr("images", "remove", ref)
    log = server.log()
    assert "Traceback" not in log, log
