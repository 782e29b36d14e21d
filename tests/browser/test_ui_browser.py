"""The web UI in a real Chromium (``harness.browser``), on images pushed with skopeo
(``harness.ui_images``): signing in through the page, browsing repositories, tags, layers,
platforms and referrers, search and filters, the copy buttons, the keyboard, deleting through
the confirmation page (seen through the registry API), permissions and forged writes with the
built-in token server, hostile content and hostile layers, accessibility (axe-core) of every
kind of page in both themes, and the README's screenshots.

The images the browsing tests share are pushed once per module (``site``: htpasswd, alice).
``DOCKYARD_SCREENSHOTS=docs/screenshots`` writes the screenshots there (otherwise they go to the
test's temporary directory, so the code path runs every time)."""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
import requests

from harness import InProcessDockyard, Server, ServerFactory, needs_skopeo
from harness.browser import assert_accessible, assert_no_script_ran, browser_log, csp_violations
from harness.dockyard import add_user
from harness.plugin import PageFactory
from harness.ui_images import (
    SPDX,
    PushedImage,
    payload,
    push_app_image,
    push_hostile_image,
    push_hostile_layer_images,
    push_multiarch_index,
    push_referrer,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = needs_skopeo

ALICE = ("alice", "alice-pw")
PULL_HOST = "registry.example.com"
VIEWPORT = {"width": 1200, "height": 800}
SCREENSHOTS_ENV = "DOCKYARD_SCREENSHOTS"


def expect(target: Any) -> Any:
    """Playwright's ``expect`` (imported when a browser test runs: Playwright is a test extra)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def short(digest: str) -> str:
    """A digest as the UI shows it (``dockyard.ui.format.short``)."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


# -- the servers -------------------------------------------------------------------------------


@dataclass
class Site:
    """The module's htpasswd server (alice may do anything) and what was pushed to it."""

    server: InProcessDockyard
    app: PushedImage  # ui/app:1.0 (amd64)
    app_arm: PushedImage  # ui/app:1.1 (arm64)
    multi: PushedImage  # ui/multi:1.0, an index of two platforms
    sbom: PushedImage  # an SPDX document referring to ui/app:1.0

    @property
    def url(self) -> str:
        return self.server.url

    def tags(self, repository: str) -> list[str]:
        """The repository's tags, through the registry API."""
        r = requests.get(self.server.v2(f"{repository}/tags/list"), auth=ALICE, timeout=30)
        assert r.status_code == 200, r.text
        return sorted(r.json()["tags"] or [])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("ui-site")
    htpasswd = work / "htpasswd"
    add_user(htpasswd, *ALICE)
    server = InProcessDockyard.start(
        tmp_path_factory.mktemp("ui-site-server"),
        auth={"htpasswd": {"realm": "dockyard", "path": str(htpasswd)}},
        ui={"pullhost": PULL_HOST},
    )
    try:
        creds = ":".join(ALICE)
        images = work / "images"
        app = push_app_image(server, images, creds=creds)
        app_arm = push_app_image(server, images, tag="1.1", arch="arm64", creds=creds)
        multi = push_multiarch_index(server, images, creds=creds)
        sbom = push_referrer(server, images, app, creds=creds)
        # small images for the delete test to take tags from
        server.session.auth = ALICE
        for tag in ("keep-1", "remove-me", "keep-2"):
            server.push_image("ui/scratch", tag)
        yield Site(server, app, app_arm, multi, sbom)
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-5000:]


def token_server(start_server: ServerFactory, tmp_path: Path) -> Server:
    """The built-in token server: alice may do anything in team/*, bob may only pull."""
    users = tmp_path / "users"
    add_user(users, *ALICE)
    add_user(users, "bob", "bob-pw")
    return start_server(
        auth={
            "token": {
                "realm": "http://127.0.0.1/auth/token",
                "service": "dockyard",
                "issuer": "dockyard",
                "server": {
                    "htpasswd": str(users),
                    "access": [
                        {"repository": "team/*", "users": ["alice"], "actions": ["*"]},
                        {"repository": "team/*", "users": ["bob"], "actions": ["pull"]},
                    ],
                },
            }
        }
    )


def bearer(s: Server, repository: str, actions: str) -> dict[str, str]:
    r = requests.get(
        s.url + "/auth/token",
        params={"service": "dockyard", "scope": f"repository:{repository}:{actions}"},
        auth=ALICE,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


# -- helpers -----------------------------------------------------------------------------------


def sign_in(page: Page, base: str, path: str = "/ui/", user: str = "alice", pw: str = "") -> None:
    """Open ``path``, be sent to the sign-in page, type the credentials, click "Sign in" and be
    brought back to ``path``."""
    page.goto(base + path)
    where = urlsplit(page.url)
    assert where.path == "/ui/login", page.url
    assert parse_qs(where.query)["next"] == [path]
    page.locator("#username").press_sequentially(user)
    page.locator("#password").press_sequentially(pw or f"{user}-pw")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + path)
    expect(page.locator("header .who")).to_contain_text(f"Signed in as {user}")


def texts(locator: Locator) -> list[str]:
    return [t.strip() for t in locator.all_inner_texts()]


def cells(page: Page, n: int, within: str = "main") -> list[str]:
    """The ``n``-th cell of every body row of the first table in ``within``."""
    return texts(page.locator(within).locator("table").first.locator(f"tbody tr > :nth-child({n})"))


def section(page: Page, heading_id: str) -> Locator:
    return page.locator(f'section[aria-labelledby="{heading_id}"]')


def focused(page: Page) -> dict[str, Any]:
    return dict(
        page.evaluate(
            """() => {
              const e = document.activeElement;
              return {tag: e.tagName, id: e.id, cls: e.className, name: e.name || "",
                      value: e.value || "", text: (e.textContent || "").trim(),
                      checked: e.type === "checkbox" ? e.checked : null,
                      inMain: !!e.closest("main")};
            }"""
        )
    )


def tab_to(page: Page, wanted: Callable[[dict[str, Any]], bool], most: int = 60) -> dict[str, Any]:
    """Press Tab until the focused element satisfies ``wanted``; the element."""
    seen = []
    for _ in range(most):
        page.keyboard.press("Tab")
        now = focused(page)
        if wanted(now):
            return now
        seen.append(now["id"] or now["text"] or now["tag"])
    raise AssertionError(f"not reached with Tab; focus went through {seen}")


def checked(page: Page, selector: str) -> list[bool]:
    return list(page.eval_on_selector_all(selector, "(boxes) => boxes.map((b) => b.checked)"))


def assert_inert(page: Page) -> None:
    """No pushed text ran, was blocked by the CSP, or became markup or a link elsewhere."""
    assert_no_script_ran(page)
    assert csp_violations(page) == [], (page.url, csp_violations(page))
    assert browser_log(page).page_errors == [], browser_log(page).page_errors
    found = page.evaluate(
        """() => {
          const out = {links: [], elements: [], handlers: []};
          for (const a of document.querySelectorAll("a[href], area[href]")) {
            if (!["http:", "https:"].includes(a.protocol) || a.origin !== location.origin)
              out.links.push(a.getAttribute("href"));
          }
          const stray = "iframe, frame, object, embed, img, video, audio, base, style, "
            + "meta[http-equiv], svg:not(.chart), math, textarea, script:not([src])";
          for (const e of document.querySelectorAll(stray)) out.elements.push(e.outerHTML);
          for (const s of document.scripts)
            if (new URL(s.src).pathname !== "/ui/static/ui.js") out.elements.push(s.outerHTML);
          for (const e of document.querySelectorAll("*"))
            for (const attr of e.attributes)
              if (attr.name.startsWith("on")) out.handlers.push(e.outerHTML.slice(0, 200));
          return out;
        }"""
    )
    assert page.locator('a[href^="javascript:" i]').count() == 0, page.url
    assert found == {"links": [], "elements": [], "handlers": []}, (page.url, found)


def read_png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- 1. signing in and browsing ----------------------------------------------------------------


def test_sign_in_and_browse_images_an_index_and_a_referrer(
    site: Site, new_page: PageFactory
) -> None:
    s = site
    page = new_page(permissions=["clipboard-read", "clipboard-write"], viewport=VIEWPORT)

    # every page sends a visitor who has not signed in to the sign-in page, which brings them
    # back
    sign_in(page, s.url)
    repositories = page.locator("main table.list tbody tr td:first-child a")
    assert texts(repositories) == ["ui/app", "ui/multi", "ui/scratch"]

    # search narrows the list
    page.get_by_label("Search repositories").fill("multi")
    page.get_by_label("Search repositories").press("Enter")
    page.wait_for_url(re.compile(r"[?&]q=multi"))
    assert texts(repositories) == ["ui/multi"]
    page.get_by_label("Search repositories").fill("no-such-thing")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"[?&]q=no-such-thing"))
    assert repositories.count() == 0
    expect(page.locator("main")).to_contain_text("No repository you may see has")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Repositories").click()
    page.wait_for_url(s.url + "/ui/")
    assert texts(repositories) == ["ui/app", "ui/multi", "ui/scratch"]

    # the column headers sort: by size, largest first, then smallest first
    name_header = page.locator("thead th", has_text="Name")
    size_header = page.locator("thead th", has_text="Size")
    assert name_header.get_attribute("aria-sort") == "ascending"
    size_header.get_by_role("link").click()
    page.wait_for_url(re.compile(r"[?&]sort=size&order=desc$"))
    assert size_header.get_attribute("aria-sort") == "descending"
    assert name_header.get_attribute("aria-sort") is None
    assert texts(repositories) == ["ui/app", "ui/multi", "ui/scratch"]
    size_header.get_by_role("link").click()
    page.wait_for_url(re.compile(r"[?&]sort=size&order=asc$"))
    assert size_header.get_attribute("aria-sort") == "ascending"
    assert texts(repositories) == ["ui/scratch", "ui/multi", "ui/app"]

    # repository -> its tags, filtered
    page.get_by_role("link", name="ui/app", exact=True).click()
    page.wait_for_url(s.url + "/ui/r/ui/app")
    assert cells(page, 2) == ["1.0", "1.1"]
    assert cells(page, 4) == ["image", "image"]
    page.get_by_label("Filter tags").fill("1.1")
    page.get_by_label("Filter tags").press("Enter")
    page.wait_for_url(re.compile(r"[?&]q=1\.1"))
    assert cells(page, 2) == ["1.1"]
    page.get_by_label("Filter tags").fill("nope")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"[?&]q=nope"))
    expect(page.locator("main")).to_contain_text("No tag has “nope” in its name.")
    page.get_by_label("Filter tags").fill("")
    page.get_by_label("Filter tags").press("Enter")
    page.wait_for_url(re.compile(r"/ui/r/ui/app\?q=$"))
    assert cells(page, 2) == ["1.0", "1.1"]

    # the tag's page
    page.get_by_role("link", name="1.0", exact=True).click()
    page.wait_for_url(s.url + "/ui/r/ui/app/-/tag/1.0")
    expect(page.locator("h1")).to_have_text("ui/app:1.0")
    expect(page.locator("main dl.facts").first).to_contain_text(s.app.digest)
    config = section(page, "config-h")
    expect(config).to_contain_text("linux/amd64")
    expect(config).to_contain_text('["/bin/app"]')
    expect(config).to_contain_text("org.opencontainers.image.version")

    # the copy button puts the docker pull command on the clipboard (or selects it)
    command = f"docker pull {PULL_HOST}/ui/app:1.0"
    expect(page.locator("#pull-docker")).to_have_text(command)
    expect(page.locator("#pull-podman")).to_have_text(f"podman pull {PULL_HOST}/ui/app:1.0")
    copy = page.locator('button[data-copy="pull-docker"]')
    copy.click()
    expect(copy).not_to_have_text("Copy")
    if copy.inner_text() == "Copied":
        assert page.evaluate("() => navigator.clipboard.readText()") == command
    else:  # no clipboard: the command is selected instead, for Ctrl+C
        expect(copy).to_have_text("Selected: press Ctrl+C")
        assert page.evaluate("() => window.getSelection().toString()") == command
    expect(copy).to_have_text("Copy", timeout=5000)  # and the button says so again

    # each layer's file list shows the files the builder put in it
    layers = section(page, "layers-h").locator("tbody tr td:nth-child(2) a")
    assert texts(layers) == [short(layer.digest) for layer in s.app.layers]
    for i, layer in enumerate(s.app.layers):
        layers.nth(i).click()
        page.wait_for_url(f"{s.url}/ui/r/ui/app/-/layer/{layer.digest}")
        expect(page.locator("main dl.facts")).to_contain_text("tar+gzip")
        paths = texts(page.locator("table.files tbody tr td:nth-child(4) span.wrap"))
        assert sorted(p.rstrip("/") for p in paths) == sorted(layer.names)
        assert page.locator("main .error").count() == 0  # complete: no warning
        page.go_back()
        page.wait_for_url(s.url + "/ui/r/ui/app/-/tag/1.0")
    layers.first.click()
    link = page.locator("table.files tbody tr", has_text="bin/sh")
    assert texts(link.locator("td:nth-child(2)")) == ["symlink"]
    assert texts(link.locator("td:nth-child(5)")) == ["app"]
    page.go_back()

    # the referrer, with its artifact type, and its own page pointing back
    referrers = section(page, "referrers-h").locator("tbody tr")
    assert referrers.count() == 1
    assert texts(referrers.locator("td:nth-child(1)")) == [SPDX]
    referrers.locator("td:nth-child(2) a").click()
    page.wait_for_url(f"{s.url}/ui/r/ui/app/-/manifest/{s.sbom.digest}")
    assert page.locator("dt", has_text="Artifact type").locator("+ dd").inner_text() == SPDX
    page.locator("dt", has_text="Refers to").locator("+ dd a").click()
    page.wait_for_url(f"{s.url}/ui/r/ui/app/-/manifest/{s.app.digest}")
    expect(section(page, "referrers-h")).to_contain_text(SPDX)

    # the index: its platforms on the repository page, then each platform's manifest
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Repositories").click()
    page.get_by_role("link", name="ui/multi", exact=True).click()
    page.wait_for_url(s.url + "/ui/r/ui/multi")
    assert cells(page, 4) == ["index"]
    assert cells(page, 5) == ["linux/amd64, linux/arm64/v8"]
    page.get_by_role("link", name="1.0", exact=True).click()
    page.wait_for_url(s.url + "/ui/r/ui/multi/-/tag/1.0")
    platforms = section(page, "platforms-h")
    assert texts(platforms.locator("tbody tr td:nth-child(1)")) == ["linux/amd64", "linux/arm64/v8"]
    links = platforms.locator("tbody tr td:nth-child(2) a")
    assert texts(links) == [short(child.digest) for child in s.multi.children]
    assert section(page, "layers-h").count() == 0
    links.nth(1).click()
    arm = s.multi.children[1]
    page.wait_for_url(f"{s.url}/ui/r/ui/multi/-/manifest/{arm.digest}")
    assert page.locator("dt", has_text="Platform").first.locator("+ dd").inner_text() == (
        "linux/arm64/v8"
    )
    child_layers = section(page, "layers-h").locator("tbody tr td:nth-child(2) a")
    assert texts(child_layers) == [short(layer.digest) for layer in arm.layers]
    expect(page.locator("#pull-docker")).to_have_text(
        f"docker pull {PULL_HOST}/ui/multi@{arm.digest}"
    )
    assert_inert(page)

    # signing out (a form's POST) ends the session: every page sends to the sign-in page again
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(s.url + "/ui/login")
    expect(page.locator("header .who")).not_to_contain_text("Signed in")
    page.goto(s.url + "/ui/r/ui/app")
    assert urlsplit(page.url).path == "/ui/login"


def test_keyboard_skip_link_checkboxes_and_buttons(site: Site, page: Page) -> None:
    s = site
    # no clipboard here (as on plain http from another host): Copy selects the command instead
    page.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'clipboard', "
        "{get: () => undefined, configurable: true});"
    )
    sign_in(page, s.url, "/ui/r/ui/app")
    page.reload()  # focus back at the start of the document

    # the skip link is the first stop, and Enter on it moves on to the content
    first = tab_to(page, lambda e: True, most=1)
    assert first["tag"] == "A" and "skip" in first["cls"] and first["text"] == "Skip to content"
    expect(page.locator("a.skip")).to_be_in_viewport()  # shown while focused
    page.keyboard.press("Enter")
    assert page.evaluate("() => location.hash") == "#main"
    after = tab_to(page, lambda e: True, most=1)
    assert after["inMain"], f"Tab after the skip link went to {after}"

    # the tag boxes toggle with Space, one at a time and all at once
    boxes = 'main input[type=checkbox][name="tag"]'
    tab_to(page, lambda e: e["id"] == "select-all")
    page.keyboard.press("Space")
    assert checked(page, boxes) == [True, True]
    page.keyboard.press("Space")
    assert checked(page, boxes) == [False, False]
    tab_to(page, lambda e: e["id"] == "tag-1")
    page.keyboard.press("Space")
    assert checked(page, boxes) == [True, False]
    tab_to(page, lambda e: e["id"] == "tag-2")
    page.keyboard.press("Space")
    page.keyboard.press("Space")
    assert checked(page, boxes) == [True, False]

    # "Delete selected…" is reachable and opens the confirmation for the selected tag; its
    # "Cancel" leads back
    tab_to(page, lambda e: e["tag"] == "BUTTON" and e["text"] == "Compare two selected")
    tab_to(page, lambda e: e["tag"] == "BUTTON" and e["text"] == "Delete selected…", most=1)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ui/r/ui/app/-/delete\?tag=1\.0$"))
    expect(page.locator("ul.plan")).to_contain_text("The tag 1.0")
    tab_to(page, lambda e: e["tag"] == "BUTTON" and e["text"] == "Delete 1 item")
    tab_to(page, lambda e: e["tag"] == "A" and e["text"] == "Cancel", most=1)
    page.keyboard.press("Enter")
    page.wait_for_url(s.url + "/ui/r/ui/app")
    assert s.tags("ui/app") == ["1.0", "1.1"]

    # two boxes and "Compare two selected", by keyboard
    page.reload()
    tab_to(page, lambda e: e["id"] == "tag-1")
    page.keyboard.press("Space")
    tab_to(page, lambda e: e["id"] == "tag-2")
    page.keyboard.press("Space")
    tab_to(page, lambda e: e["tag"] == "BUTTON" and e["text"] == "Compare two selected")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ui/r/ui/app/-/compare\?tag=1\.0&tag=1\.1$"))
    expect(page.locator("h1")).to_have_text("Compare two tags of ui/app")
    expect(page.locator("#a")).to_have_value("1.0")
    expect(page.locator("#b")).to_have_value("1.1")
    # the base layer differs (its files name the architecture), the application's does not
    expect(page.locator("main")).to_contain_text("1 layer in common.")
    layer_rows = page.locator("main table.compare").first.locator("tbody tr")
    assert [row.get_attribute("class") for row in layer_rows.all()] == ["differs", "same"]
    config_rows = page.locator("main table.compare").nth(1).locator("tbody tr")
    assert texts(config_rows) == ["platform\tlinux/amd64\tlinux/arm64"]

    # the copy buttons work from the keyboard too; without a clipboard they select the command
    page.goto(s.url + "/ui/r/ui/app/-/tag/1.1")
    copy = tab_to(page, lambda e: e["tag"] == "BUTTON" and e["text"] == "Copy")
    assert copy["inMain"]
    page.keyboard.press("Enter")
    button = page.locator('button[data-copy="pull-docker"]')
    expect(button).to_have_text("Selected: press Ctrl+C")
    selected = page.evaluate("() => window.getSelection().toString()")
    assert selected == f"docker pull {PULL_HOST}/ui/app:1.1"
    assert_inert(page)


# -- 2. deleting through the UI ----------------------------------------------------------------


def test_delete_a_tag_through_the_confirmation_page(site: Site, page: Page) -> None:
    s = site
    assert s.tags("ui/scratch") == ["keep-1", "keep-2", "remove-me"]
    sign_in(page, s.url, "/ui/r/ui/scratch")
    # nothing selected: nothing to confirm
    page.get_by_role("button", name="Delete selected…").click()
    page.wait_for_url(re.compile(r"/ui/r/ui/scratch/-/delete\??$"))  # a form of no field
    expect(page.locator("main")).to_contain_text("Nothing selected.")
    assert page.get_by_role("button", name=re.compile("^Delete")).count() == 0
    page.get_by_role("link", name="Back to ui/scratch").click()
    page.wait_for_url(f"{s.url}/ui/r/ui/scratch")

    page.get_by_role("checkbox", name="Select remove-me").check()
    page.get_by_role("button", name="Delete selected…").click()
    page.wait_for_url(f"{s.url}/ui/r/ui/scratch/-/delete?tag=remove-me")
    plan = page.locator("ul.plan li")
    assert plan.count() == 1
    expect(plan).to_contain_text("The tag remove-me")
    expect(plan).to_contain_text("stays")  # only the tag goes, not its manifest
    page.get_by_role("button", name="Delete 1 item").click()
    page.wait_for_url(re.compile(r"/ui/r/ui/scratch\?deleted=1$"))
    expect(page.get_by_role("status")).to_have_text("Deleted 1 item.")
    assert cells(page, 2) == ["keep-1", "keep-2"]
    assert s.tags("ui/scratch") == ["keep-1", "keep-2"]
    assert_inert(page)


# -- 3. permissions and forged writes (token server) -------------------------------------------


_POST = """
async ([url, fields]) => {
  const r = await fetch(url, {method: "POST", body: new URLSearchParams(fields)});
  return {status: r.status, text: await r.text(), url: r.url};
}
"""


def test_token_server_rights_and_forged_posts(
    start_server: ServerFactory, tmp_path: Path, new_page: PageFactory
) -> None:
    s = token_server(start_server, tmp_path)
    push = requests.Session()
    push.headers.update(bearer(s, "team/app", "pull,push"))
    s.session = push
    for tag in ("1", "2"):
        s.push_image("team/app", tag)
    pull = bearer(s, "team/app", "pull")

    def api_tags() -> list[str]:
        r = requests.get(s.v2("team/app/tags/list"), headers=pull, timeout=30)
        assert r.status_code == 200, r.text
        return sorted(r.json()["tags"] or [])

    delete_url = s.url + "/ui/r/team/app/-/delete"

    # bob may pull: no delete button, no delete links, and a forged delete is refused
    bob = new_page()
    sign_in(bob, s.url, "/ui/r/team/app", user="bob")
    assert cells(bob, 2) == ["1", "2"]
    expect(bob.get_by_role("button", name="Compare two selected")).to_be_visible()
    assert bob.get_by_role("button", name=re.compile("Delete")).count() == 0
    bob.get_by_role("link", name="1", exact=True).click()
    bob.wait_for_url(s.url + "/ui/r/team/app/-/tag/1")
    assert bob.locator("main a, main button", has_text=re.compile("Delete")).count() == 0
    token = bob.locator('form input[name="csrf"]').first.input_value()
    forged = bob.evaluate(_POST, [delete_url, {"tag": "1", "csrf": token}])
    assert forged["status"] == 403, forged
    assert "you may not delete" in forged["text"]
    assert api_tags() == ["1", "2"]
    # nor is the confirmation page his to see
    assert bob.goto(delete_url + "?tag=1").status == 403

    # alice may delete, but not without the form's CSRF token
    alice = new_page()
    sign_in(alice, s.url, "/ui/r/team/app")
    expect(alice.get_by_role("button", name="Delete selected…")).to_be_visible()
    bare = alice.evaluate(_POST, [delete_url, {"tag": "1"}])
    assert bare["status"] == 403 and "CSRF token is missing" in bare["text"], bare
    bobs = alice.evaluate(_POST, [delete_url, {"tag": "1", "csrf": token}])
    assert bobs["status"] == 403 and "CSRF token" in bobs["text"], bobs  # another session's
    assert api_tags() == ["1", "2"]
    # the confirmation page's form without its hidden token: refused too
    alice.get_by_role("checkbox", name="Select 1").check()
    alice.get_by_role("button", name="Delete selected…").click()
    alice.wait_for_url(delete_url + "?tag=1")
    alice.locator('form input[name="csrf"]').last.evaluate("(input) => input.remove()")
    with alice.expect_response(lambda r: r.request.method == "POST") as refused:
        alice.get_by_role("button", name="Delete 1 item").click()
    assert refused.value.status == 403
    expect(alice.locator("h1")).to_contain_text("CSRF token is missing")
    assert api_tags() == ["1", "2"]
    # and with it, the delete goes through (the refusals above were the token's doing)
    alice.goto(delete_url + "?tag=1")
    alice.get_by_role("button", name="Delete 1 item").click()
    alice.wait_for_url(re.compile(r"/ui/r/team/app\?deleted=1$"))
    assert api_tags() == ["2"]
    assert_inert(alice)
    assert_inert(bob)


# -- 4. hostile content ------------------------------------------------------------------------


def test_hostile_content_stays_inert_on_every_page(
    start_server: ServerFactory, tmp_path: Path, page: Page
) -> None:
    s = start_server()
    hostile = push_hostile_image(s, tmp_path)
    name, tag = hostile.repository, str(hostile.tag)
    referrer = hostile.referrers[0]
    shown = [
        "/ui/",
        f"/ui/r/{name}",
        f"/ui/r/{name}/-/tag/{tag}",
        f"/ui/r/{name}/-/manifest/{hostile.digest}",
        f"/ui/r/{name}/-/compare?{urlencode({'a': tag, 'b': tag})}",
        "/ui/usage",
        *(f"/ui/r/{name}/-/layer/{digest}" for digest in hostile.layer_digests),
        f"/ui/r/{name}/-/manifest/{referrer.digest}",
    ]
    for path in shown:
        response = page.goto(s.url + path)
        assert response is not None and response.status == 200, path
        assert_inert(page)
    # the payloads are on the pages as text (not dropped): a label, a file name, a referrer's
    # artifact type
    page.goto(f"{s.url}/ui/r/{name}/-/tag/{tag}")
    main = page.locator("main").inner_text()
    assert hostile.payloads["label:script"] in main
    assert hostile.payloads["history:attr"] in main
    assert hostile.payloads["referrer-artifact-type:script"] in main
    page.goto(f"{s.url}/ui/r/{name}/-/layer/{hostile.layer_digests[0]}")
    assert hostile.payloads["file:svg"] in page.locator("table.files").inner_text()

    # every link of the tag page and the referrer's page, followed from the keyboard
    for path in (f"/ui/r/{name}/-/tag/{tag}", f"/ui/r/{name}/-/manifest/{referrer.digest}"):
        page.goto(s.url + path)
        count = page.locator("a[href]").count()
        assert count >= 8, count
        for i in range(count):
            page.goto(s.url + path)
            link = page.locator("a[href]").nth(i)
            target = link.evaluate("(a) => a.href")
            link.focus()
            if urlsplit(target)._replace(fragment="") == urlsplit(page.url)._replace(fragment=""):
                page.keyboard.press("Enter")  # the skip link: no navigation
            else:
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert page.url == target
            assert_inert(page)

    # what a visitor types comes back as text too: search fields, compare, sign-in's next
    reflected = payload("script", "reflected:script") + payload("attr", "reflected:attr")
    for path, query in (
        ("/ui/", {"q": reflected}),
        (f"/ui/r/{name}", {"q": reflected}),
        (f"/ui/r/{name}/-/layer/{hostile.layer_digests[0]}", {"q": reflected}),
        (f"/ui/r/{name}/-/compare", {"a": reflected, "b": tag}),
        ("/ui/usage", {"q": reflected}),
        ("/ui/login", {"next": payload("url", "reflected:next")}),
    ):
        response = page.goto(f"{s.url}{path}?{urlencode(query)}")
        assert response is not None and response.status < 500, path
        assert_inert(page)
    # hostile names in the path of a URL: refused, and not echoed as markup
    response = page.goto(s.url + "/ui/r/" + quote(reflected, safe=""))
    assert response is not None and 400 <= response.status < 500
    assert_inert(page)


# -- 5. hostile layers -------------------------------------------------------------------------


def test_hostile_layers_are_listed_within_bounds(
    start_server: ServerFactory, tmp_path: Path, page: Page
) -> None:
    s = start_server(
        ui={"layers": {"maxentries": 1000, "maxbytes": "64MiB", "timeout": "10s", "perminute": 100}}
    )
    images = push_hostile_layer_images(s, tmp_path)
    names = ["bomb", "many-entries", "not-tar", "zstd"]
    assert [layer.digest for layer in images["all"].layers] == [
        images[n].layers[0].digest for n in names
    ]
    tag_page = f"{s.url}/ui/r/ui/layers/-/tag/all"
    messages = page.locator("main p.error")
    for i, kind in enumerate(names):
        page.goto(tag_page)
        started = time.monotonic()
        section(page, "layers-h").locator("tbody tr td:nth-child(2) a").nth(i).click()
        page.wait_for_url(f"{s.url}/ui/r/ui/layers/-/layer/{images[kind].layers[0].digest}")
        took = time.monotonic() - started
        assert took < 15, (kind, took)
        files = page.locator("table.files tbody tr td:nth-child(4) span.wrap")
        if kind == "bomb":
            expect(messages).to_have_text(
                re.compile(r"^Listing incomplete: stopped after 64\.0 MiB decompressed")
            )
            assert texts(files) == ["bomb/zeros"]
        elif kind == "many-entries":
            expect(messages).to_have_text(re.compile(r"^Listing incomplete: stopped after 1000 "))
            assert files.count() == 500  # a page of them
            assert [p.rstrip("/") for p in texts(files)[:2]] == ["many", "many/0000000"]
            page.get_by_role("link", name="Next page").click()
            expect(page.locator("main nav.pages")).to_contain_text("page 2 of 2")
            assert files.count() == 500
        elif kind == "not-tar":
            expect(messages).to_have_text(re.compile(r"^This layer cannot be listed: "))
            assert page.locator("table.files").count() == 0
        else:
            assert messages.count() == 0
            expect(page.locator("main dl.facts")).to_contain_text("tar+zstd")
            paths = sorted(p.rstrip("/") for p in texts(files))
            assert paths == sorted(images["zstd"].layers[0].names)
        assert_inert(page)

    # and the server is still quick to answer
    started = time.monotonic()
    response = page.goto(s.url + "/ui/")
    assert response is not None and response.status == 200
    assert time.monotonic() - started < 3
    assert "ui/layers" in texts(page.locator("main table.list tbody tr td:first-child a"))
    r = requests.get(s.url + "/ui/", timeout=5)
    assert r.status_code == 200 and r.elapsed.total_seconds() < 2


# -- 6. accessibility --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_kind_of_page_is_accessible(site: Site, new_page: PageFactory, scheme: str) -> None:
    s = site
    page = new_page(color_scheme=scheme, viewport=VIEWPORT)
    page.goto(s.url + "/ui/login")
    assert_accessible(page, f"the sign-in page ({scheme})")
    page.locator("#username").fill("alice")
    page.locator("#password").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Incorrect user name or password")
    assert_accessible(page, f"the sign-in page with an error ({scheme})")
    sign_in(page, s.url)
    assert_accessible(page, f"the repositories ({scheme})")
    kinds = {
        "a repository": "/ui/r/ui/app",
        "a repository after a delete": "/ui/r/ui/app?deleted=2",
        "an image's tag": "/ui/r/ui/app/-/tag/1.0",
        "an index's tag": "/ui/r/ui/multi/-/tag/1.0",
        "a referrer": f"/ui/r/ui/app/-/manifest/{s.sbom.digest}",
        "a layer's files": f"/ui/r/ui/app/-/layer/{s.app.layers[0].digest}",
        "a comparison": "/ui/r/ui/app/-/compare?a=1.0&b=1.1",
        "the usage": "/ui/usage",
        "a delete's confirmation": "/ui/r/ui/scratch/-/delete?tag=keep-1&digest=" + s.app.digest,
    }
    for what, path in kinds.items():
        response = page.goto(s.url + path)
        assert response is not None and response.status == 200, path
        assert_accessible(page, f"{what} ({scheme})")
    response = page.goto(s.url + "/ui/r/ui/no-such-repository")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_contain_text("no repository")
    assert_accessible(page, f"the error page ({scheme})")
    # the focused skip link, too (it is on screen only while focused)
    page.goto(s.url + "/ui/")
    page.keyboard.press("Tab")
    assert_accessible(page, f"the focused skip link ({scheme})", include="a.skip")
    assert_inert(page)


# -- 7. the README's screenshots ---------------------------------------------------------------


def test_screenshots_for_the_readme(site: Site, new_page: PageFactory, tmp_path: Path) -> None:
    s = site
    target = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    shots = {
        ("repositories", "light"): "/ui/",
        ("repository", "light"): "/ui/r/ui/app",
        ("tag", "light"): "/ui/r/ui/app/-/tag/1.0",
        ("tag-dark", "dark"): "/ui/r/ui/app/-/tag/1.0",
    }
    pages: dict[str, Page] = {}
    for (name, scheme), path in shots.items():
        if scheme not in pages:
            pages[scheme] = new_page(viewport=VIEWPORT, color_scheme=scheme)
            sign_in(pages[scheme], s.url)
        page = pages[scheme]
        response = page.goto(s.url + path)
        assert response is not None and response.status == 200
        page.mouse.move(0, 0)
        png = target / f"{name}.png"
        page.screenshot(path=png, full_page=False, animations="disabled")
        assert read_png_size(png) == (VIEWPORT["width"], VIEWPORT["height"])
        assert png.stat().st_size < 400_000, (png, png.stat().st_size)
    dark_background = pages["dark"].evaluate(
        "() => getComputedStyle(document.body).backgroundColor"
    )
    light_background = pages["light"].evaluate(
        "() => getComputedStyle(document.body).backgroundColor"
    )
    assert dark_background != light_background == "rgb(255, 255, 255)"
