"""The browser harness itself (``harness.browser``, ``harness.ui_images``): the test images are
pushed and served as made, their payloads run when a page renders them unescaped, and the
detectors detect: ``__pwned`` calls, dialogs, CSP violations, console and page errors, and
accessibility violations (axe-core, also under a strict CSP)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import html
import http.server
import io
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import OCI_INDEX, OCI_MANIFEST, ServerFactory, get_manifest, needs_skopeo, sha256
from harness.browser import (
    AXE_VERSION,
    Chromium,
    assert_accessible,
    assert_no_script_ran,
    axe_violations,
    browser_log,
    csp_violations,
)
from harness.plugin import PageFactory
from harness.ui_images import (
    GZIP_LAYER,
    PAYLOADS,
    SPDX,
    ZSTD_LAYER,
    PushedImage,
    push_app_image,
    push_hostile_image,
    push_hostile_layer_images,
    push_multiarch_index,
    push_referrer,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

#: a page with an image without text (axe: image-alt, critical), a button without a name
#: (button-name, critical), and script: inline, in an attribute, a dialog, an error
HOSTILE_PAGE = """<!doctype html>
<html lang="en"><head><title>harness check</title><script src="/app.js"></script></head>
<body><main><h1>Harness check</h1>
<img src="/missing.png">
<button></button>
<script>__pwned("inline"); alert("inline dialog"); console.error("inline console error");</script>
<img src="/missing-too.png" alt="" onerror='__pwned("onerror")'>
<script>throw new Error("uncaught inline error");</script>
</main></body></html>
"""
APP_JS = "window.appScriptRan = true;\n"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; under ``/csp/``, with a strict Content-Security-Policy."""

    def end_headers(self) -> None:
        if self.path.startswith("/csp/"):
            self.send_header("Content-Security-Policy", STRICT_CSP)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """``HOSTILE_PAGE`` at ``/index.html`` and ``/csp/index.html`` of a static server on
    loopback; its URL."""
    root = tmp_path / "site"
    for directory in (root, root / "csp"):
        directory.mkdir(parents=True)
        (directory / "index.html").write_text(HOSTILE_PAGE)
    (root / "app.js").write_text(APP_JS)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- the detectors -----------------------------------------------------------------------------


def test_detectors_without_csp(page: Page, site: str) -> None:
    page.goto(f"{site}/index.html")
    assert page.evaluate("() => window.appScriptRan") is True
    log = browser_log(page)
    assert sorted(log.pwned) == ["inline", "onerror"]
    assert log.dialogs == [("alert", "inline dialog")]
    assert any("inline console error" in e for e in log.console_errors), log.console_errors
    assert any("uncaught inline error" in e for e in log.page_errors), log.page_errors
    assert csp_violations(page) == []
    with pytest.raises(AssertionError) as ran:
        assert_no_script_ran(page)
    assert "__pwned('inline')" in str(ran.value) and "alert dialog" in str(ran.value)

    with pytest.raises(AssertionError) as inaccessible:
        assert_accessible(page, "the harness's check page")
    message = str(inaccessible.value)
    assert "image-alt [critical]" in message and 'img src="/missing.png"' in message
    assert "button-name [critical]" in message and "the harness's check page" in message
    found = {v["id"]: v for v in axe_violations(page)}
    assert len(found["image-alt"]["nodes"]) == 1  # the other image has alt=""
    # only serious and critical ones fail, unless asked
    assert_accessible(
        page,
        "without those two rules",
        options={"rules": {"image-alt": {"enabled": False}, "button-name": {"enabled": False}}},
    )
    # the recorders survive navigation: the first document's calls stay in the log
    page.goto(f"{site}/index.html")
    assert sorted(browser_log(page).pwned) == ["inline", "inline", "onerror", "onerror"]
    browser_log(page).clear()  # provoked on purpose (the fixture fails a test with script)
    assert_no_script_ran(page)


def test_detectors_under_a_strict_csp(page: Page, site: str) -> None:
    page.goto(f"{site}/csp/index.html")
    assert page.evaluate("() => window.appScriptRan") is True  # script-src 'self' runs
    assert_no_script_ran(page)  # nothing inline ran, no dialog
    violations = csp_violations(page)
    directives = sorted(v["effectiveDirective"] for v in violations)
    assert directives == ["script-src-attr", "script-src-elem", "script-src-elem"], violations
    assert all(v["blockedURI"] == "inline" for v in violations)
    assert browser_log(page).page_errors == []  # the throwing script was blocked too

    # axe runs under the page's CSP (injected by evaluate, not by an inline script tag), and
    # its injection is no violation
    found = {v["id"] for v in axe_violations(page)}
    assert {"image-alt", "button-name"} <= found
    with pytest.raises(AssertionError, match="image-alt"):
        assert_accessible(page, "the check page under CSP")
    assert len(csp_violations(page)) == 3


def test_contexts_are_separate(new_page: PageFactory, site: str) -> None:
    first, second = new_page(), new_page(bypass_csp=True)
    first.set_content("<p>quiet</p>")
    second.goto(f"{site}/csp/index.html")  # its CSP bypassed: the inline script runs
    assert sorted(browser_log(second).pwned) == ["inline", "onerror"]
    assert csp_violations(second) == []
    assert_no_script_ran(first)
    assert browser_log(first).dialogs == []
    browser_log(second).clear()


def test_asyncio_beside_the_browser(chromium: Chromium) -> None:
    """Playwright's loop is parked between browser tests: asyncio.run works in the worker's
    other tests, and the browser again after."""

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert asyncio.run(answer()) == 42
    with chromium.active():
        page = chromium.new_page()
        page.set_content("<p>after asyncio.run</p>")
        assert page.text_content("p") == "after asyncio.run"
        page.context.close()
    assert asyncio.run(answer()) == 42
    assert chromium.version.split(".")[0].isdigit()


# -- the images --------------------------------------------------------------------------------


def _served(server: ServerFactory, image: PushedImage, reference: str | None = None) -> None:
    r = get_manifest(server, image.repository, reference or image.tag or image.digest)
    assert r.headers["Docker-Content-Digest"] == image.digest
    assert r.content == image.manifest
    for blob in ([image.config_digest] if image.config_digest else []) + list(image.layer_digests):
        head = requests.head(server.v2(f"{image.repository}/blobs/{blob}"), timeout=30)
        assert head.status_code == 200, (image.reference, blob)


def _wait_for_pwned(page: Page, calls: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while len(browser_log(page).pwned) < calls and time.monotonic() < deadline:
        page.wait_for_timeout(50)


def _referrers(server: ServerFactory, image: PushedImage) -> list[dict]:
    r = requests.get(server.v2(f"{image.repository}/referrers/{image.digest}"), timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX, r.text
    return list(r.json()["manifests"])


@needs_skopeo
def test_images(start_server: ServerFactory, tmp_path: Path, new_page: PageFactory) -> None:
    server = start_server()

    # (a) a normal image: config, two layers of files, directories, symlinks, a whiteout
    app = push_app_image(server, tmp_path)
    _served(server, app)
    config = requests.get(server.v2(f"ui/app/blobs/{app.config_digest}"), timeout=30).json()
    assert config == app.config
    assert config["config"]["Entrypoint"] == ["/bin/app"] and config["config"]["ExposedPorts"]
    assert sum(not h.get("empty_layer") for h in config["history"]) == len(app.layers) == 2
    blob = requests.get(server.v2(f"ui/app/blobs/{app.layer_digests[0]}"), timeout=30).content
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        members = {m.name: m for m in tar}
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "app"
    assert members["etc"].isdir() and members["bin/app"].mode == 0o755
    assert "etc/.wh.motd" in app.layers[1].names

    # (b) an index of two platforms
    multi = push_multiarch_index(server, tmp_path)
    _served(server, multi)
    index = get_manifest(server, "ui/multi", "1.0").json()
    platforms = [
        (m["platform"]["architecture"], m["platform"].get("variant")) for m in index["manifests"]
    ]
    assert platforms == [("amd64", None), ("arm64", "v8")]
    for child in multi.children:
        _served(server, child, child.digest)
        assert child.config and child.config["architecture"] in ("amd64", "arm64")

    # (c) an SBOM referring to (a), pushed by digest
    sbom = push_referrer(server, tmp_path, app)
    _served(server, sbom, sbom.digest)
    assert sbom.manifest_json["subject"] == app.descriptor
    referrers = _referrers(server, app)
    assert [(m["digest"], m["artifactType"]) for m in referrers] == [(sbom.digest, SPDX)]
    filtered = requests.get(
        server.v2(f"ui/app/referrers/{app.digest}"), params={"artifactType": SPDX}, timeout=30
    )
    assert [m["digest"] for m in filtered.json()["manifests"]] == [sbom.digest]

    # (d) the hostile image and its hostile referrer
    hostile = push_hostile_image(server, tmp_path)
    _served(server, hostile)
    referrer = hostile.referrers[0]
    (listed,) = _referrers(server, hostile)
    assert listed["digest"] == referrer.digest
    assert (
        PAYLOADS["script"].replace("{t}", "referrer-artifact-type:script") in listed["artifactType"]
    )
    assert (
        listed["annotations"]["referrer-annotation:attr"]
        == hostile.payloads["referrer-annotation:attr"]
    )
    served_config = requests.get(
        server.v2(f"ui/hostile/blobs/{hostile.config_digest}"), timeout=30
    ).json()
    assert served_config == hostile.config
    assert len(hostile.payloads) > 100

    # the payloads are live: each rendered unescaped in a document of its own (an iframe's
    # srcdoc: a payload that opens a raw-text element would swallow the ones after it) runs,
    # and the javascript: URLs run from a link's href (escaped) when clicked; escaped as text,
    # none does
    page = new_page()
    is_url = {k: k.split(":")[1].startswith("url") for k in hostile.payloads}
    text_payloads = [v for k, v in hostile.payloads.items() if not is_url[k]]
    url_payloads = [v for k, v in hostile.payloads.items() if is_url[k]]
    page.set_content(
        "<main>"
        + "".join(
            f'<p><a id="a{i}" href="{html.escape(v)}">a</a></p>' for i, v in enumerate(url_payloads)
        )
        + "".join(f'<iframe srcdoc="{html.escape(v)}"></iframe>' for v in text_payloads)
        + "</main>"
    )
    for i in range(len(url_payloads)):
        page.click(f"#a{i}")
    _wait_for_pwned(page, len(hostile.payloads))
    assert sorted(browser_log(page).pwned) == sorted(hostile.payloads)
    browser_log(page).clear()
    escaped = new_page()
    escaped.set_content(
        "<main>"
        + "".join(f"<div>{html.escape(v)}</div>" for v in text_payloads)
        + "".join(f'<a href="#x" title="{html.escape(v)}">a</a>' for v in url_payloads)
        + "</main>"
    )
    assert escaped.locator("main").inner_text().count("__pwned(") == len(text_payloads)
    assert_no_script_ran(escaped)

    # (e) layers that must not be read whole
    layers = push_hostile_layer_images(server, tmp_path)
    assert set(layers) == {"bomb", "many-entries", "not-tar", "zstd", "all"}
    for image in layers.values():
        _served(server, image)
    assert len(layers["all"].layers) == 4
    bomb = layers["bomb"].layers[0]
    assert bomb.size < 8 << 20 and bomb.uncompressed_size > 4 << 30
    start = zlib.decompressobj(31).decompress(bomb.blob[:4096], 1 << 20)
    header = tarfile.TarInfo.frombuf(start[:512], "utf-8", "surrogateescape")
    assert header.name == "bomb/zeros" and header.size == 4 << 30 and not start[512:].strip(b"\0")
    assert int.from_bytes(bomb.blob[-4:], "little") == bomb.uncompressed_size % (1 << 32)
    many = layers["many-entries"].layers[0]
    assert many.entry_count == 1_000_001 and many.size < 16 << 20
    start = zlib.decompressobj(31).decompress(many.blob[:65536], 5 * 512)
    names = [
        tarfile.TarInfo.frombuf(start[i : i + 512], "utf-8", "strict").name
        for i in range(0, 2560, 512)
    ]
    assert names == ["many", "many/0000000", "many/0000001", "many/0000002", "many/0000003"]
    not_tar = layers["not-tar"].layers[0]
    with (
        pytest.raises(tarfile.ReadError),
        tarfile.open(fileobj=io.BytesIO(not_tar.blob), mode="r:gz"),
    ):
        pass
    zstd = layers["zstd"].layers[0]
    assert zstd.media_type == ZSTD_LAYER and bomb.media_type == not_tar.media_type == GZIP_LAYER
    assert zstd.blob[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame's magic
    assert get_manifest(server, "ui/layers", "zstd").json()["layers"][0]["mediaType"] == ZSTD_LAYER
    assert all(image.media_type == OCI_MANIFEST for image in layers.values())
    assert sha256(bomb.blob) == bomb.digest
    assert AXE_VERSION
