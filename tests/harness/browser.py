"""Chromium driven by Playwright, for the web UI's tests (``tests/browser/``).

One Chromium per pytest worker (Debian's ``/usr/bin/chromium``; ``playwright install`` is never
run, it downloads from the internet), a fresh context and page per test. Every context records
what a hostile image must never make the UI do, and what a strict Content-Security-Policy
stopped it from doing:

- calls of ``window.__pwned(tag)``: the payloads of the hostile test images
  (``harness.ui_images``) call it, so a call means injected script ran;
- dialogs (``alert``, ``confirm``, ``prompt``), dismissed as they open;
- ``securitypolicyviolation`` events (CSP violations, also report-only ones);
- console errors and uncaught page errors.

An init script (run in every frame before the page's own scripts, and not subject to the page's
CSP) defines ``__pwned`` and listens for violations; each record goes to Python at once through
a binding and is also kept in the document, where the helpers read it back (the binding's
messages can lag behind the page by a task). ``browser_log(page)`` is the whole record;
``assert_no_script_ran``, ``csp_violations`` and ``assert_accessible`` are the checks the tests
make. The ``page`` fixture's teardown fails a test in which script ran (a ``__pwned`` call or a
dialog) even if the test never checked; a test that provokes one on purpose clears the log
(``browser_log(page).clear()``) after checking it.

Accessibility: axe-core, vendored in ``tests/browser/vendor/axe.min.js`` (axe-core 4.14.1 from
npm, ``npm pack axe-core``; see the README there). It is injected with ``page.evaluate`` of its
source: that runs over the DevTools protocol and is not subject to the page's CSP, whereas
``page.add_script_tag`` inserts an inline ``<script>`` that a ``script-src 'self'`` policy
refuses (and records as a violation). Verified with Chromium 156 and Playwright 1.65.

The event loop: Playwright's sync API keeps its asyncio loop marked as running in this thread
for as long as it is started, so ``asyncio.run`` (which many unit and API tests use) would fail
in every later test of the worker. ``Chromium`` therefore parks the loop (marks no loop
running) between browser tests and resumes it for them (``Chromium.active``); inside a browser
test, ``asyncio.run`` is unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Playwright is imported when a browser test starts (it is a test extra)
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Dialog,
        Page,
        Playwright,
        WebError,
    )

#: the Chromium to drive: $DOCKYARD_TEST_CHROMIUM, else chromium on the PATH (Debian's package)
CHROMIUM = os.environ.get("DOCKYARD_TEST_CHROMIUM") or shutil.which("chromium")
VENDOR = Path(__file__).resolve().parents[1] / "browser" / "vendor"
AXE_JS = VENDOR / "axe.min.js"
AXE_VERSION = "4.14.1"
#: the axe impacts that fail ``assert_accessible`` (the others are minor and moderate)
FAILING_IMPACTS = ("serious", "critical")
#: how long a Playwright action or navigation waits before failing (its default is 30 s)
TIMEOUT_MS = 10_000

#: the binding the init script reports to (a name no page of the UI would use)
_BINDING = "__dockyardHarnessReport"
_INIT_SCRIPT = """
(() => {
  if (Object.prototype.hasOwnProperty.call(window, '__dockyardHarness')) return;
  const doc = Math.random().toString(36).slice(2) + Date.now().toString(36);
  const records = [];
  let seq = 0;
  const record = (kind, data) => {
    const r = {kind: kind, data: data, doc: doc, seq: seq++};
    records.push(r);
    try { window[BINDING](r); } catch (e) { /* the page replaced it: read back below */ }
  };
  Object.defineProperty(window, '__dockyardHarness', {value: {records: records}});
  Object.defineProperty(window, '__pwned', {
    value: function (tag) { record('pwned', String(tag)); },
    writable: false,
    configurable: false,
  });
  document.addEventListener('securitypolicyviolation', (e) => {
    record('csp', {
      documentURI: e.documentURI,
      blockedURI: e.blockedURI,
      violatedDirective: e.violatedDirective,
      effectiveDirective: e.effectiveDirective,
      disposition: e.disposition,
      sourceFile: e.sourceFile,
      lineNumber: e.lineNumber,
      sample: e.sample,
    });
  }, true);
})();
""".replace("BINDING", repr(_BINDING))

#: the document's records, after a task (violation events are queued, not dispatched at once)
_READ_BACK = """
() => new Promise((resolve) => setTimeout(() => {
  const h = window.__dockyardHarness;
  resolve(h ? h.records.slice() : []);
}, 0))
"""

_AXE_RUN = """
async ([include, options]) => {
  const result = await axe.run(include === null ? document : include, options);
  return {
    version: result.testEngine.version,
    violations: result.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      helpUrl: v.helpUrl,
      nodes: v.nodes.map((n) => ({
        target: n.target,
        html: n.html,
        summary: n.failureSummary,
      })),
    })),
  };
}
"""


@dataclass
class BrowserLog:
    """What the pages of one browser context did (``browser_log(page)`` reads it up to date).

    ``pwned``: the tags ``__pwned`` was called with; ``dialogs``: ``(type, message)``;
    ``csp``: the violation events' fields (``effectiveDirective``, ``blockedURI``, ``sample``,
    ``sourceFile``...); ``console_errors`` and ``page_errors``: their texts."""

    pwned: list[str] = field(default_factory=list)
    dialogs: list[tuple[str, str]] = field(default_factory=list)
    csp: list[dict[str, Any]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    _seen: set[tuple[str, int]] = field(default_factory=set, repr=False)

    def clear(self) -> None:
        """Forget everything recorded so far (after a test checked what it provoked)."""
        self.pwned.clear()
        self.dialogs.clear()
        self.csp.clear()
        self.console_errors.clear()
        self.page_errors.clear()

    def script_ran(self) -> list[str]:
        """Every sign that script ran: ``__pwned`` calls and dialogs, described."""
        return [f"__pwned({tag!r})" for tag in self.pwned] + [
            f"{kind} dialog: {message!r}" for kind, message in self.dialogs
        ]

    def _add(self, record: dict[str, Any]) -> None:
        key = (str(record.get("doc")), int(record.get("seq", -1)))
        if key in self._seen:
            return
        self._seen.add(key)
        if record.get("kind") == "pwned":
            self.pwned.append(str(record.get("data")))
        elif record.get("kind") == "csp":
            self.csp.append(dict(record.get("data") or {}))


#: the log of each context the harness made
_LOGS: weakref.WeakKeyDictionary[BrowserContext, BrowserLog] = weakref.WeakKeyDictionary()


class Chromium:
    """Playwright and one Chromium for this process (a pytest worker): ``new_page`` gives a
    page in a context of its own with the recorders set up. Use it inside ``active()``."""

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright: Playwright = sync_playwright().start()
        self._loop = asyncio._get_running_loop()  # Playwright's, marked running between calls
        try:
            self.browser: Browser = self._playwright.chromium.launch(
                executable_path=executable,
                # the wrapper's /dev/shm check is harmless; a small /dev/shm in a container
                # is not
                args=["--no-sandbox", "--disable-dev-shm-usage"],
            )
        except BaseException:
            self._playwright.stop()
            raise
        self._park()

    @property
    def version(self) -> str:
        return self.browser.version

    def _park(self) -> None:
        if self._loop is not None and asyncio._get_running_loop() is self._loop:
            asyncio._set_running_loop(None)

    @contextlib.contextmanager
    def active(self) -> Iterator[Chromium]:
        """Playwright usable (its loop marked running) inside, parked again after."""
        if self._loop is not None:
            asyncio._set_running_loop(self._loop)
        try:
            yield self
        finally:
            self._park()

    def new_context(self, **options: Any) -> BrowserContext:
        """A context (``browser.new_context(**options)``: ``bypass_csp``, ``base_url``,
        ``extra_http_headers``...) whose pages are recorded (``browser_log``)."""
        context = self.browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        log = BrowserLog()
        _LOGS[context] = log
        context.expose_binding(_BINDING, lambda _source, record: log._add(record))
        context.add_init_script(_INIT_SCRIPT)

        def on_dialog(dialog: Dialog) -> None:
            log.dialogs.append((dialog.type, dialog.message))
            with contextlib.suppress(Exception):  # the page may be closing
                dialog.dismiss()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                where = message.location
                log.console_errors.append(
                    f"{message.text} ({where.get('url')}:{where.get('lineNumber')})"
                )

        def on_error(error: WebError) -> None:
            log.page_errors.append(str(error.error))

        context.on("dialog", on_dialog)
        context.on("console", on_console)
        context.on("weberror", on_error)
        return context

    def new_page(self, **options: Any) -> Page:
        """A page in a new recorded context (see ``new_context``)."""
        return self.new_context(**options).new_page()

    def close(self) -> None:
        with self.active():
            with contextlib.suppress(Exception):
                self.browser.close()
            self._playwright.stop()
        self._loop = None


def launch_chromium() -> Chromium:
    """Start Playwright and Chromium; ``pytest.skip`` if either is not installed."""
    import pytest

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return Chromium(CHROMIUM)


# -- the checks --------------------------------------------------------------------------------


def browser_log(page: Page) -> BrowserLog:
    """The record of ``page``'s context, with what the documents of its frames hold that the
    binding has not delivered yet (waiting one task of each for queued violation events)."""
    log = _LOGS.get(page.context)
    assert log is not None, "not a page of the browser harness (use the page fixture)"
    if not page.is_closed():
        for frame in page.frames:
            with contextlib.suppress(Exception):  # navigating, detached, or a crashed page
                for record in frame.evaluate(_READ_BACK):
                    log._add(record)
    return log


def assert_no_script_ran(page: Page) -> None:
    """No ``__pwned`` call and no dialog in ``page``'s context so far."""
    ran = browser_log(page).script_ran()
    assert not ran, f"script ran in {page.url}:\n  " + "\n  ".join(ran)


def csp_violations(page: Page) -> list[dict[str, Any]]:
    """The CSP violations recorded in ``page``'s context so far (every document it showed)."""
    return list(browser_log(page).csp)


def axe_violations(
    page: Page, *, include: str | None = None, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """axe-core's violations on ``page`` (of the element ``include``, a CSS selector, or the
    whole document): ``id``, ``impact``, ``help``, ``helpUrl`` and ``nodes`` (``target``,
    ``html``, ``summary``) each. ``options`` go to ``axe.run`` (``{"rules": {...}}``)."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.evaluate(_axe_source())  # not page.add_script_tag: see the module docstring
    result = page.evaluate(_AXE_RUN, [include, options or {}])
    assert result["version"] == AXE_VERSION, result["version"]
    return list(result["violations"])


def assert_accessible(
    page: Page,
    context: str,
    *,
    include: str | None = None,
    impacts: tuple[str, ...] = FAILING_IMPACTS,
    options: dict[str, Any] | None = None,
) -> None:
    """axe-core finds no violation of impact ``impacts`` (serious or critical) on ``page``;
    ``context`` says which page or state this is in the failure, which lists every such
    violation with its nodes. ``include`` and ``options``: see ``axe_violations``."""
    failing = [
        v for v in axe_violations(page, include=include, options=options) if v["impact"] in impacts
    ]
    assert not failing, f"accessibility of {context} ({page.url}):\n" + format_violations(failing)


def format_violations(violations: list[dict[str, Any]]) -> str:
    """axe violations, one paragraph each, with their nodes' selectors, HTML and summaries."""
    lines = []
    for v in violations:
        lines.append(f"- {v['id']} [{v['impact']}]: {v['help']} ({v['helpUrl']})")
        for node in v["nodes"]:
            lines.append(f"    at {' '.join(map(str, node['target']))}: {node['html'][:300]}")
            for line in (node.get("summary") or "").splitlines():
                lines.append(f"      {line}")
    return "\n".join(lines)


_AXE_SOURCE: str | None = None


def _axe_source() -> str:
    global _AXE_SOURCE
    if _AXE_SOURCE is None:
        _AXE_SOURCE = AXE_JS.read_text()
    return _AXE_SOURCE
