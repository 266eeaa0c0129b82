"""The built website, opened in a real browser: headless Chromium, networking off.

This test reads the site that ``make book`` wrote, so it is not part of the
unit-test run (``make test`` deselects the ``site`` marker); ``make site-test``
runs it after the book is built.

For every page in ``_toc.yml`` it checks that the page loads, that every image,
script and stylesheet it references loads, that the mathematics is typeset by
MathJax (and no raw TeX is left), that no JavaScript error occurs, and that no
request leaves the local site. Across all pages it checks that every internal
link (and its ``#fragment``) resolves, and that every chapter offers its
``.ipynb`` for download and a Colab launch link. It saves screenshots of a
chapter page for a person to look at.

The site is served from 127.0.0.1 by a thread in this process. Chromium runs
with a fresh profile and every other host made unreachable: DNS resolves
nothing but 127.0.0.1, and all non-loopback traffic goes to a proxy port where
nothing listens. Requests are recorded from Chromium's DevTools network log, so
an attempt to reach another host is caught even though it fails.

Settings (environment variables): ``BNBOOK_SITE`` (default ``_build/html``),
``BNBOOK_TOC`` (default ``_toc.yml``, the table of contents the site was built from),
``BNBOOK_SCREENSHOTS`` (default ``_build/screenshots``), ``CHROMIUM`` and
``CHROMEDRIVER`` (default: found on ``PATH``; Google Chrome is used if there is
no Chromium). Without a built site or without
Chromium the test is skipped with the reason, except under CI (``CI`` set),
where both are required and their absence fails it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

pytestmark = pytest.mark.site

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("BNBOOK_SITE", ROOT / "_build" / "html")).resolve()
SCREENSHOTS = Path(os.environ.get("BNBOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
TOC = Path(os.environ.get("BNBOOK_TOC", ROOT / "_toc.yml"))
IN_CI = bool(os.environ.get("CI"))

# Schemes a page may use without a network request.
LOCAL_SCHEMES = {"data", "blob", "about", "javascript"}


def _toc_docnames(toc: dict) -> list[str]:
    """Document names in the order of the table of contents (root first)."""
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", n) for n in names]


PAGES = _toc_docnames(yaml.safe_load(TOC.read_text(encoding="utf-8")))
# Pages Sphinx generates besides the table of contents; the search page runs the
# most JavaScript of all.
PAGES += ["genindex", "search"]


def _unavailable(reason: str):
    """Skip, or fail under CI, where the browser test must really run."""
    if IN_CI:
        pytest.fail(f"{reason} (required when CI is set)")
    pytest.skip(reason)


# --------------------------------------------------------------------------- #
# The local server and the browser
# --------------------------------------------------------------------------- #
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (SITE / "index.html").is_file():
        _unavailable(f"no built site at {SITE}: run `make book` first (or set BNBOOK_SITE)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# Recorded from the first script of every document, so that errors thrown
# before the test looks (or swallowed by the console) are still seen.
_ERROR_RECORDER = """
window.__bnbookErrors = [];
window.addEventListener('error', e => {
  const src = e.target && e.target.src ? ` (${e.target.src})` : '';
  const where = e.filename ? ` (${e.filename}:${e.lineno})` : src;
  window.__bnbookErrors.push(String(e.message || 'resource error') + where);
}, true);
window.addEventListener('unhandledrejection', e => {
  window.__bnbookErrors.push('unhandled rejection: ' + String(e.reason));
});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = os.environ.get("CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver_path = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chromium and driver_path and Path(chromium).is_file() and Path(driver_path).is_file()):
        _unavailable(
            f"Chromium or its driver not found (chromium: {chromium}, chromedriver: {driver_path});"
            " install them with: apt-get install chromium chromium-driver"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-quic",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # Networking off: only loopback is reachable.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path keeps Selenium Manager (which downloads drivers) out of it.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    driver.execute_cdp_cmd("Network.enable", {})
    # Every page fetches everything itself, so every page's resources are checked.
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _ERROR_RECORDER})
    yield driver
    driver.quit()


# --------------------------------------------------------------------------- #
# Visiting a page
# --------------------------------------------------------------------------- #
_WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
const start = Date.now();
(function poll() {
  if (!document.querySelector('.math')) return done('no math');
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    mj.startup.promise.then(() => done('typeset'), e => done('MathJax failed: ' + e));
  } else if (Date.now() - start > 30000) {
    done('MathJax did not start within 30 s');
  } else {
    setTimeout(poll, 50);
  }
})();
"""

_WAIT_FOR_IMAGES = """
const done = arguments[arguments.length - 1];
const images = [...document.images];
images.forEach(img => { img.loading = 'eager'; });
Promise.all(images.map(img => img.decode().then(() => true, () => false))).then(ok =>
  done(images.map((img, i) => ({src: img.currentSrc || img.src, ok: ok[i] && img.complete})))
);
"""

_PAGE_FACTS = r"""
const text = document.body.cloneNode(true);
text.querySelectorAll('pre, code, script, style, textarea, mjx-container').forEach(e => e.remove());
const plain = text.textContent;
return {
  title: document.title,
  hasMain: document.querySelector('main, article') !== null,
  scripts: [...document.scripts].filter(s => s.src).map(s => s.src),
  styles: [...document.querySelectorAll('link[rel~="stylesheet"]')].map(l => l.href),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  ids: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.name),
  mathElements: document.querySelectorAll('.math').length,
  typeset: document.querySelectorAll('mjx-container').length,
  untypeset: [...document.querySelectorAll('span.math, div.math')]
      .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.trim().slice(0, 80)),
  mathErrors: [...document.querySelectorAll('mjx-merror')]
      .map(e => e.getAttribute('data-mjx-error') || e.textContent),
  rawDisplayMath: plain.includes('$$'),
  rawInlineMath: (plain.match(/\$[^$\n]*[\\^_{}][^$\n]*\$/g) || []).slice(0, 3),
  errors: window.__bnbookErrors || [],
};
"""


def _network_log(driver) -> list[dict]:
    """DevTools network events since the last call, as dicts with a ``method``."""
    events = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method", "").startswith("Network."):
            events.append(message)
    return events


def _drain(driver) -> dict:
    """Requests, responses, failed loads and console errors logged since the last call."""
    requests, responses, failures = {}, {}, []
    for event in _network_log(driver):
        params = event["params"]
        if event["method"] == "Network.requestWillBeSent":
            requests[params["requestId"]] = params["request"]["url"]
        elif event["method"] == "Network.responseReceived":
            responses[params["response"]["url"]] = params["response"]["status"]
        elif event["method"] == "Network.loadingFailed":
            failed = requests.get(params["requestId"], params["requestId"])
            failures.append(f"{failed}: {params.get('errorText')}")
    console_errors = [
        e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")
    ]
    return {
        "requests": set(requests.values()),
        "responses": responses,
        "failures": failures,
        "console_errors": console_errors,
    }


def _merge_late(page: dict, late: dict) -> None:
    """Add what a page logged after it was inspected (late loads) to its record."""
    page["requests"] |= late["requests"]
    page["responses"].update(late["responses"])
    page["failures"] += late["failures"]
    page["console_errors"] += late["console_errors"]


def _visit(driver, base_url: str, docname: str) -> dict:
    url = base_url + docname + ".html"
    driver.get(url)
    math_state = driver.execute_async_script(_WAIT_FOR_MATH)
    images = driver.execute_async_script(_WAIT_FOR_IMAGES)
    facts = driver.execute_script(_PAGE_FACTS)
    return {"url": url, "math_state": math_state, "images": images, **_drain(driver), **facts}


def _is_local(url: str, base_url: str) -> bool:
    return urlsplit(url).scheme in LOCAL_SCHEMES or url.startswith(base_url)


def _screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _chapter_page() -> str:
    """The page to photograph: the first chapter notebook, else the first non-root page."""
    chapters = [p for p in PAGES if p.startswith("notebooks/")]
    return chapters[0] if chapters else PAGES[min(1, len(PAGES) - 1)]


@pytest.fixture(scope="module")
def site(browser, base_url):
    """Visit every page of the table of contents once; return what was seen, by page."""
    seen = {}
    shot = _chapter_page()
    _drain(browser)  # start from an empty log
    previous = None
    for docname in PAGES:
        if previous is not None:
            _merge_late(seen[previous], _drain(browser))
        seen[docname] = _visit(browser, base_url, docname)
        previous = docname
        if docname == shot:
            name = docname.replace("/", "_")
            _screenshot(browser, f"{name}-top")
            # A second view further down, where the figures and equations are.
            browser.execute_script(
                "const a = 'article.bd-article';"
                "const t = document.querySelector(`${a} .cell_output img, ${a} figure img`)"
                "  || document.querySelector(`${a} img, ${a} mjx-container[display='true']`);"
                "if (t) t.scrollIntoView({block: 'center'});"
            )
            _screenshot(browser, f"{name}-figure")
    browser.get("about:blank")  # unloads the last page; its late requests are logged by now
    _merge_late(seen[previous], _drain(browser))
    return seen


# --------------------------------------------------------------------------- #
# The checks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("docname", PAGES)
def test_page_loads_with_all_its_resources(site, base_url, docname):
    page = site[docname]
    assert page["responses"].get(page["url"]) == 200, f"{page['url']} did not load"
    assert page["hasMain"] and page["title"], f"{docname}: empty page"
    for kind in ("scripts", "styles"):
        for src in page[kind]:
            if urlsplit(src).scheme in LOCAL_SCHEMES:
                continue
            status = page["responses"].get(src)
            assert status == 200, f"{docname}: {kind[:-1]} {src} answered {status}"
    broken = [img["src"] for img in page["images"] if not img["ok"]]
    assert not broken, f"{docname}: images that did not load: {broken}"
    bad = {url: status for url, status in page["responses"].items() if status >= 400}
    assert not bad, f"{docname}: failed requests: {bad}"
    assert not page["failures"], f"{docname}: requests that failed: {page['failures']}"


@pytest.mark.parametrize("docname", PAGES)
def test_no_request_leaves_the_site(site, base_url, docname):
    outside = [u for u in site[docname]["requests"] if not _is_local(u, base_url)]
    assert not outside, f"{docname} requested other hosts: {outside}"


@pytest.mark.parametrize("docname", PAGES)
def test_math_is_typeset(site, docname):
    page = site[docname]
    assert page["math_state"] in ("typeset", "no math"), f"{docname}: {page['math_state']}"
    if page["mathElements"]:
        assert page["typeset"] > 0, f"{docname}: math present but no MathJax output"
        local_mathjax = [u for u in page["requests"] if "/_static/mathjax/" in u]
        assert local_mathjax, f"{docname}: MathJax was not loaded from the site itself"
    assert not page["untypeset"], f"{docname}: math left untypeset: {page['untypeset'][:3]}"
    assert not page["mathErrors"], f"{docname}: MathJax errors: {page['mathErrors'][:3]}"
    assert not page["rawDisplayMath"], f"{docname}: raw $$ left in the text"
    assert not page["rawInlineMath"], f"{docname}: raw $...$ left: {page['rawInlineMath']}"


@pytest.mark.parametrize("docname", PAGES)
def test_no_javascript_errors(site, docname):
    page = site[docname]
    errors = page["errors"] + page["console_errors"]
    assert not errors, f"{docname}: JavaScript errors: {errors}"


def test_internal_links_resolve(site, base_url):
    ids_by_file = {SITE / (d + ".html"): set(page["ids"]) for d, page in site.items()}
    problems = set()
    for docname, page in site.items():
        for href in page["links"]:
            if not href.startswith(base_url):
                continue  # external: a link, never fetched by the page
            parts = urlsplit(href)
            path = unquote(parts.path[1:]) or "index.html"
            target = SITE / path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.add(f"{docname}: {href} -> missing file {path}")
                continue
            fragment = unquote(parts.fragment)
            if not fragment or target.suffix != ".html":
                continue
            if target not in ids_by_file:
                html = target.read_text(encoding="utf-8", errors="replace")
                ids_by_file[target] = set(re.findall(r'\b(?:id|name)="([^"]+)"', html))
            if fragment not in ids_by_file[target]:
                problems.add(f"{docname}: {href} -> no element #{fragment}")
    assert not problems, "broken internal links:\n" + "\n".join(sorted(problems))


@pytest.mark.parametrize("docname", [p for p in PAGES if p.startswith("notebooks/")])
def test_chapter_has_download_and_colab_buttons(site, base_url, docname):
    links = site[docname]["links"]
    download = f"{base_url}_sources/{docname}.ipynb"
    assert download in links, f"{docname}: no download link to its .ipynb"
    colab = [u for u in links if u.startswith("https://colab.research.google.com/github/")]
    assert colab and colab[0].endswith(f"/{docname}.ipynb"), f"{docname}: Colab link {colab}"


def test_root_redirects_to_the_landing_page(browser, base_url):
    from selenium.webdriver.support.ui import WebDriverWait

    landing = base_url + PAGES[0] + ".html"
    browser.get(base_url)
    WebDriverWait(browser, 10).until(lambda d: d.current_url.startswith(landing))


def test_screenshot_saved(site):
    shots = sorted(SCREENSHOTS.glob(_chapter_page().replace("/", "_") + "-*.png"))
    assert len(shots) == 2 and all(s.stat().st_size > 10_000 for s in shots), shots
