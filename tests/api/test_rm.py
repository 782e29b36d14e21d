"""``dockyard rm``: a repository deleted while a server serves it. The command's output and exit
statuses, its ``delete`` events reaching a receiver through the server's outbox, and the delete
racing pushes and pulls on several workers: afterwards fsck is clean and every repository the
catalog lists has every tag complete (manifest and blobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
from test_events import notifications

from harness import Server, ServerFactory, sha256
from harness.dockyard import run_command as dockyard
from harness.receiver import Receiver


def catalog(s: Server) -> list[str]:
    r = s.session.get(s.v2("_catalog"))
    assert r.status_code == 200, r.text
    return r.json()["repositories"]


def assert_complete(s: Server, name: str) -> dict[str, str]:
    """Every tag of ``name`` resolves to a manifest whose blobs the repository serves; returns
    tag -> manifest digest."""
    tags = s.session.get(s.v2(f"{name}/tags/list")).json().get("tags") or []
    found = {}
    for tag in tags:
        r = s.session.get(s.v2(f"{name}/manifests/{tag}"), headers={"Accept": OCI})
        assert r.status_code == 200, (name, tag, r.text)
        manifest = r.json()
        for blob in [manifest["config"], *manifest["layers"]]:
            head = s.session.head(s.v2(f"{name}/blobs/{blob['digest']}"))
            assert head.status_code == 200, (name, tag, blob["digest"], head.status_code)
        found[tag] = r.headers["Docker-Content-Digest"]
    return found


OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.slow
def test_rm_removes_the_repository_and_not_the_one_nested_in_it(
    start_server: ServerFactory,
) -> None:
    # Clients may not delete (storage.delete.enabled: false); the operator's command may.
    s = start_server(storage={"delete": {"enabled": False}})
    config = str(s.config_path)
    first, manifest = s.push_image("team/app", "v1")
    second, _ = s.push_image("team/app", "v2")
    s.push_image("team/app/sub", "v1")
    assert catalog(s) == ["team/app", "team/app/sub"]

    dry = dockyard("rm", "team/app", config, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove tag team/app:v1 ({first})" in dry.stdout
    assert f"would remove manifest team/app@{second}" in dry.stdout
    assert dry.stdout.splitlines()[-1] == (
        "would remove repository team/app: 2 tags, 2 manifests, 4 layer links, "
        "0 uploads in progress"
    )
    assert catalog(s) == ["team/app", "team/app/sub"]

    done = dockyard("rm", "team/app", config, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tags"] == {"v1": first, "v2": second} and report["layer_links"] == 4
    assert report["dry_run"] is False and report["settled"] is True
    assert catalog(s) == ["team/app/sub"]
    assert s.session.get(s.v2("team/app/manifests/v1")).status_code == 404
    layer = manifest["layers"][0]["digest"]
    assert s.session.head(s.v2(f"team/app/blobs/{layer}")).status_code == 404
    assert list(assert_complete(s, "team/app/sub")) == ["v1"]

    again = dockyard("rm", "team/app", config)
    assert again.returncode == 3 and "no repository named team/app" in again.stderr
    invalid = dockyard("rm", "Team/App", config)
    assert invalid.returncode == 2 and "invalid repository name" in invalid.stderr
    # the name is free again
    s.push_image("team/app", "v3")
    assert catalog(s) == ["team/app", "team/app/sub"]


@pytest.mark.slow
def test_rm_sends_delete_events_through_the_servers_outbox(start_server: ServerFactory) -> None:
    receiver = Receiver().start()
    try:
        s = start_server(notifications=notifications(receiver))
        digest, _ = s.push_image("team/app", "v1")
        receiver.wait_for(3)
        result = dockyard("rm", "team/app", str(s.config_path))
        assert result.returncode == 0, result.stderr
        events = receiver.wait_for(6, settle=0.3)[3:]
        assert [(e["action"], e["target"]) for e in events] == [
            ("delete", {"digest": digest, "repository": "team/app"}),
            ("delete", {"repository": "team/app", "tag": "v1"}),
            ("delete", {"repository": "team/app", "dockyard": {"kind": "repository"}}),
        ]
        for e in events:
            assert set(e) == {"id", "timestamp", "action", "target", "request", "actor", "source"}
            assert e["request"]["method"] == "DELETE"
            assert e["request"]["useragent"].startswith("dockyard/")
            assert e["actor"] == {"name": "dockyard rm"}
    finally:
        receiver.stop()


# -- racing pushes and pulls ------------------------------------------------------------------

#: the first round stops pushing soon after the delete's first pass, the last one after it
ROUNDS = 2
PUSHERS = 4
PULLERS = 2
#: how long pushes go on after the delete's first pass (in the last round: after it finished)
OVERLAP = 0.2
#: answers a client may get from a push or pull racing the delete: clean failures
CLEAN = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_UNKNOWN",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_UNKNOWN",
    "NAME_UNKNOWN",
}


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.unclean: list[str] = []
        #: tag -> manifest digest of every push answered 201
        self.pushed: dict[str, str] = {}

    def answer(self, what: str, r: requests.Response, ok: tuple[int, ...]) -> bool:
        with self.lock:
            if r.status_code in ok:
                self.counts[f"{what} {r.status_code}"] += 1
                return True
            try:
                code = r.json()["errors"][0]["code"]
            except (ValueError, KeyError, IndexError):
                code = f"no error body ({r.status_code})"
            self.counts[f"{what} {code}"] += 1
            if r.status_code >= 500 or code not in CLEAN:
                self.unclean.append(f"{what}: {r.status_code} {r.text[:300]}")
            return False


def upload(
    session: requests.Session, s: Server, ledger: Ledger, data: bytes, chunked: bool
) -> bool:
    digest = sha256(data)
    base = s.v2("race/app/blobs/uploads/")
    if not chunked:
        r = session.post(base, params={"digest": digest}, data=data)
        return ledger.answer("blob POST", r, (201,))
    r = session.post(base)
    if not ledger.answer("upload start", r, (202,)):
        return False
    half = len(data) // 2
    r = session.patch(
        urljoin(s.url, r.headers["Location"]),
        data=data[:half],
        headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"},
    )
    if not ledger.answer("upload PATCH", r, (202,)):
        return False
    r = session.put(
        urljoin(s.url, r.headers["Location"]),
        params={"digest": digest},
        data=data[half:],
        headers={"Content-Type": "application/octet-stream"},
    )
    return ledger.answer("upload PUT", r, (201,))


def push(session: requests.Session, s: Server, ledger: Ledger, tag: str, chunked: bool) -> None:
    """A push as clients make it: the blobs, then the manifest (nothing more after a failure)."""
    config = json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode()
    layer = os.urandom(4096)
    for data in (config, layer):
        if not upload(session, s, ledger, data, chunked):
            return
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [{"mediaType": OCI, "digest": sha256(layer), "size": len(layer)}],
        }
    ).encode()
    r = session.put(s.v2(f"race/app/manifests/{tag}"), data=manifest, headers={"Content-Type": OCI})
    if ledger.answer("manifest PUT", r, (201,)):
        with ledger.lock:
            ledger.pushed[tag] = sha256(manifest)


def pull(session: requests.Session, s: Server, ledger: Ledger, name: str) -> None:
    r = session.get(s.v2(f"{name}/manifests/base"), headers={"Accept": OCI})
    if not ledger.answer(f"{name} manifest GET", r, (200,)):
        return
    for blob in [r.json()["config"], *r.json()["layers"]]:
        ledger.answer(
            f"{name} blob GET", session.get(s.v2(f"{name}/blobs/{blob['digest']}")), (200,)
        )


def pusher(
    s: Server, ledger: Ledger, go: threading.Barrier, stop: threading.Event, name: str
) -> None:
    session = requests.Session()
    go.wait()
    n = 0
    while not stop.is_set():
        push(session, s, ledger, f"{name}-{n}", chunked=n % 2 == 1)
        n += 1


def puller(s: Server, ledger: Ledger, go: threading.Barrier, stop: threading.Event) -> None:
    session = requests.Session()
    go.wait()
    while not stop.is_set():
        pull(session, s, ledger, "race/app")
        pull(session, s, ledger, "race/app/sub")


def race(s: Server, ledger: Ledger, round_: int, until_finished: bool) -> dict[str, Any]:
    """``dockyard rm race/app`` while pushers and pullers run; the pushes stop a moment after
    its first pass took ``base`` (no pusher pushes that tag), or, ``until_finished``, after the
    command ended. Returns its report."""
    s.push_image("race/app", "base", [b"shared layer"])
    stop_pushing, stop_pulling = threading.Event(), threading.Event()
    go = threading.Barrier(PUSHERS + PULLERS + 1)
    threads = [
        threading.Thread(target=pusher, args=(s, ledger, go, stop_pushing, f"r{round_}-p{i}"))
        for i in range(PUSHERS)
    ]
    threads += [
        threading.Thread(target=puller, args=(s, ledger, go, stop_pulling)) for _ in range(PULLERS)
    ]
    for thread in threads:
        thread.start()
    go.wait()
    rm = subprocess.Popen(
        [sys.executable, "-m", "dockyard", "rm", "race/app", str(s.config_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while rm.poll() is None and (
            until_finished or s.session.head(s.v2("race/app/manifests/base")).status_code == 200
        ):
            time.sleep(0.02)
        time.sleep(OVERLAP)
    finally:
        stop_pushing.set()
        out, err = rm.communicate(timeout=60)
        stop_pulling.set()
        for thread in threads:
            thread.join(60)
    # 4: pushes still arrived in its last pass (allowed; what it means is checked after)
    assert rm.returncode in (0, 4), err
    report: dict[str, Any] = json.loads(out)
    return report


@pytest.mark.slow
def test_rm_while_pushing_and_pulling_leaves_a_consistent_store(
    start_server: ServerFactory,
) -> None:
    """Each round: the repository holds an image tagged ``base``; pushers push new images to it
    without pause (monolithic and chunked uploads, then the manifest), pullers pull it and the
    repository nested in it, on three workers; ``dockyard rm`` runs, and the pushes go on until
    a moment after its first pass — in the last round until after it finished, so the
    repository is pushed again while it is deleted. Every answer is a success or a clean 4xx;
    the nested repository never fails a pull; afterwards the catalog is consistent (every
    listed repository's tags complete, the deleted one absent or holding exactly what was
    pushed after it) and, at the end, fsck is clean with no manifest lacking a blob link (no
    sparse manifest)."""
    s = start_server(workers=3)
    config = str(s.config_path)
    ledger = Ledger()
    s.push_image("race/app/sub", "base", [b"shared layer"])
    for round_ in range(ROUNDS):
        last = round_ == ROUNDS - 1
        assert race(s, ledger, round_, until_finished=last)["passes"] >= 2
        listed = catalog(s)
        assert "race/app/sub" in listed
        for name in listed:
            tags = assert_complete(s, name)
            if name == "race/app":  # pushed again after the delete: whole, as pushed
                assert all(ledger.pushed.get(t) == d for t, d in tags.items() if t != "base")
        # the next round starts from an empty repository
        if "race/app" in listed and not last:
            assert dockyard("rm", "race/app", config).returncode == 0

    print(sorted(ledger.counts.items()))
    assert not ledger.unclean, ledger.unclean[:10]
    assert ledger.counts["race/app/sub manifest GET 200"] > 0
    assert not [k for k in ledger.counts if k.startswith("race/app/sub") and "200" not in k]
    fsck = dockyard("fsck", config, "--json")
    report = json.loads(fsck.stdout)
    assert fsck.returncode == 0 and report["clean"], report["problems"]
    assert report["sparse_manifests"] == 0
    log = s.log()
    assert "Traceback" not in log, log[-5000:]
    assert "level=error" not in log, [x for x in log.splitlines() if "level=error" in x]
