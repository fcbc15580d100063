"""Every page opens clean in a real browser (issue 11): headless Chromium, driven by
Playwright, loads a `vizkit run` report (four techniques, the metrics' charts) and a
`vizkit compare` page, and finds no console error or warning, no page error, no request
outside the report's folder (every request is recorded), and every ``<img>`` decoded; the
full-size view (``#full-N``, CSS :target) shows the picture over the page. The checker
itself is tested on pages it must reject, so it cannot pass everything.

The browser is the system's Chromium (Debian: ``apt-get install chromium``; another one by
``VIZKIT_CHROMIUM``), never one Playwright downloads; without it, or without Playwright
(``pip install 'vizkit[test]'``), these tests skip and say so. Load times (navigation to
the ``load`` event) are printed (``pytest tests/test_browser.py -rP``) and recorded as
test properties, not asserted: speed is measured by benchmarks, not timed tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner

from conftest import build_tiny, raise_a_class, write_image
from vizkit.cli import main

TECHNIQUES = ["-t", "activations", "-t", "filters", "-t", "gradcam", "-t", "saliency",
              "-s", "filters.count=4", "-s", "filters.steps=3", "-s", "filters.size=32"]
# The metrics stay on (the evidence charts are part of the page), with fewer steps.
CHEAP_METRICS = ["-s", "faithfulness.steps=4", "-s", "randomization.images=1", "-s", "randomization.steps=1"]

# What the page says about itself, read in the page once it has loaded.
INSPECT = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  return {
    load_ms: nav ? nav.loadEventEnd : null,
    scripts: document.scripts.length,
    images: Array.from(document.images, (img, i) => ({
      index: i, id: img.id, alt: img.alt, src: img.getAttribute('src').slice(0, 60),
      complete: img.complete, natural_width: img.naturalWidth})),
  };
}"""

# Each full-size view in turn, by its fragment: is the wrapper the :target, fixed over the
# window, its picture on top (what the middle of its visible part hits) and at least as
# wide as in the page, as its own pixels, and as 40rem (or the window less 2rem)?
FULL_SIZE_VIEWS = """async () => {
  const views = [];
  for (const zoom of document.querySelectorAll('.zoom')) {
    const img = zoom.querySelector('img');
    const before = img.getBoundingClientRect();
    location.hash = '#' + zoom.id;
    await new Promise(requestAnimationFrame);
    const after = img.getBoundingClientRect();
    const x = Math.max(0, Math.min(after.left + after.width / 2, innerWidth - 1));
    const y = Math.max(0, Math.min(after.top + Math.min(after.height, innerHeight - after.top) / 2, innerHeight - 1));
    views.push({id: zoom.id, target: zoom.matches(':target'), position: getComputedStyle(zoom).position,
                before: before.width, after: after.width, natural: img.naturalWidth,
                least: Math.min(40 * parseFloat(getComputedStyle(document.documentElement).fontSize), innerWidth - 32),
                left: after.left, top: after.top,
                on_top: document.elementFromPoint(x, y) === img});
  }
  history.replaceState(null, '', location.pathname);
  return views;
}"""


def _chromium() -> str | None:
    return os.environ.get("VIZKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium through Playwright, or a skip that says what to install."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install 'vizkit[test]' (or pip install playwright); "
                    "it drives the system's Chromium, no browser download needed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (Debian/Ubuntu), or set VIZKIT_CHROMIUM "
                    "to a Chromium or Chrome executable")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
    # The pages are static files: no name resolves, so a stray request cannot reach a network.
    args.append("--host-resolver-rules=MAP * ~NOTFOUND")
    playwright = sync_playwright().start()
    try:
        started = time.perf_counter()
        chromium = playwright.chromium.launch(executable_path=executable, args=args, headless=True)
        print(f"Chromium {chromium.version} ({executable}) started in {time.perf_counter() - started:.2f} s")
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


@dataclass
class PageCheck:
    """What one page load showed; ``problems()`` lists what makes it fail."""

    url: str
    folder: Path
    console: list[tuple[str, str]] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    scripts: int = 0
    load_ms: float | None = None  # navigation start to the end of the load event, in the page's clock
    goto_s: float = 0.0  # the same from Python: goto() until the load event

    def outside(self, url: str) -> bool:
        """A request that leaves the report: anything but data: and file: inside the folder."""
        parsed = urlparse(url)
        if parsed.scheme == "data":
            return False
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            return True
        return not Path(unquote(parsed.path)).resolve().is_relative_to(self.folder)

    def undecoded(self) -> list[dict]:
        return [image for image in self.images if not (image["complete"] and image["natural_width"] > 0)]

    def problems(self) -> list[str]:
        return ([f"console {level}: {text}" for level, text in self.console if level in ("error", "warning")]
                + [f"page error: {error}" for error in self.page_errors]
                + [f"request outside the report: {url}" for url in self.requests if self.outside(url)]
                + [f"failed request: {failure}" for failure in self.failed_requests]
                + [f"image not decoded: #{image['index']} {image['id']} {image['src']!r} ({image['alt']})"
                   for image in self.undecoded()])


def check_page(browser, page_file: Path, fragment: str = "", record=None) -> tuple[PageCheck, object]:
    """Load ``page_file`` (with ``#fragment``) in a new page, recording everything; returns
    the check and the still open page (the caller closes it)."""
    page_file = page_file.resolve()
    url = page_file.as_uri() + (f"#{fragment}" if fragment else "")
    check = PageCheck(url, page_file.parent)
    page = browser.new_page()
    page.on("console", lambda message: check.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: check.page_errors.append(str(error)))
    page.on("request", lambda request: check.requests.append(request.url))
    page.on("requestfailed", lambda request: check.failed_requests.append(f"{request.url} ({request.failure})"))
    page.on("websocket", lambda socket: check.requests.append(socket.url))
    started = time.perf_counter()
    page.goto(url, wait_until="load")
    check.goto_s = time.perf_counter() - started
    facts = page.evaluate(INSPECT)
    check.images, check.scripts, check.load_ms = facts["images"], facts["scripts"], facts["load_ms"]
    name = f"{page_file.parent.name}/{page_file.name}" + (f"#{fragment}" if fragment else "")
    print(f"{name}: load event after {check.load_ms:.0f} ms (goto {check.goto_s * 1000:.0f} ms), "
          f"{page_file.stat().st_size / 1e6:.2f} MB, {len(check.images)} images, {len(check.requests)} request(s)")
    if record is not None:
        record(f"load_ms {name}", round(check.load_ms))
    return check, page


def _vizkit(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False, obj={"plugins": []})
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pages(browser, tmp_path_factory):
    """Two real runs (all four techniques, metrics, arrays) of a tiny model and of the same
    model with one class raised (so the comparison has flips and moved maps), and their
    comparison. Made only once a browser is there to open them."""
    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    images.mkdir()
    for seed, size in enumerate([(40, 48), (48, 48), (56, 40)]):
        write_image(images / f"image{seed}.png", size=size, seed=seed)
    model = build_tiny()
    model.save(root / "base.keras")
    common = [*TECHNIQUES, *CHEAP_METRICS, "--save-arrays", "-q"]
    _vizkit("run", root / "base.keras", images, "-o", root / "base", *common)
    raise_a_class(model, root / "base")
    model.save(root / "new.keras")
    _vizkit("run", root / "new.keras", images, "-o", root / "new", *common)
    _vizkit("compare", root / "base", root / "new", "-o", root / "comparison", "-q")
    return root


def test_report_page_opens_clean(browser, pages, record_property):
    report = json.loads((pages / "base" / "report.json").read_text())
    assert {t["name"]: t["status"] for t in report["techniques"]} == dict.fromkeys(
        ["activations", "filters", "gradcam", "saliency"], "ok")
    assert any(t["evidence"] for t in report["techniques"])  # the metrics ran: charts on the page
    check, page = check_page(browser, pages / "base" / "index.html", record=record_property)
    try:
        assert check.problems() == []
        assert check.requests == [check.url]  # the page itself, nothing else
        assert check.scripts == 0  # "no JavaScript", as the README says
        # every picture of the report is on the page (as data: URIs, none of them broken)
        assert len(check.images) >= 3 + sum(len(t["artifacts"]) for t in report["techniques"])
        assert page.locator("svg.chart").count() > 0
    finally:
        page.close()


def test_comparison_page_opens_clean(browser, pages, record_property):
    data = json.loads((pages / "comparison" / "compare.json").read_text())
    assert data["predictions"]["flips"] >= 1 and {row["technique"] for row in data["similarity"]} == {"gradcam", "saliency"}
    check, page = check_page(browser, pages / "comparison" / "index.html", record=record_property)
    try:
        assert check.problems() == []
        assert check.requests == [check.url]
        assert check.scripts == 0
        assert len(check.images) >= 6  # base | new | difference, for the maps that moved most
    finally:
        page.close()


@pytest.mark.parametrize("page_name", ["base", "comparison"])
def test_every_full_size_view_shows_its_picture_over_the_page(browser, pages, page_name):
    check, page = check_page(browser, pages / page_name / "index.html")
    try:
        views = page.evaluate(FULL_SIZE_VIEWS)
        assert len(views) == len(check.images) > 0  # every picture can open
        wrong = [view for view in views
                 if not (view["target"] and view["position"] == "fixed" and view["on_top"]
                         and view["after"] + 0.5 >= max(view["before"], view["natural"], view["least"])
                         and view["left"] >= 0 and view["top"] >= 0)]
        assert wrong == []
        # the test pages' pictures are all small: each opens larger than the page shows it
        assert all(view["after"] > view["before"] for view in views)
        assert check.problems() == []
    finally:
        page.close()


def test_a_full_size_url_opens_the_picture_and_its_close_link_goes_back(browser, pages, record_property):
    """A link to one picture (``index.html#full-N``, as a reader would share it) opens with
    that picture over the page; its close link (anywhere beside it) goes back to it."""
    index = pages / "base" / "index.html"
    normal, page = check_page(browser, index)
    n = len(normal.images) // 2 + 1  # one in the middle of the page: a technique's picture
    picture = page.locator(f"#picture-{n}")
    width_in_page = picture.bounding_box()["width"]
    page.close()

    check, page = check_page(browser, index, f"full-{n}", record=record_property)
    try:
        assert check.problems() == []
        assert page.locator(f"#full-{n}").evaluate("zoom => zoom.matches(':target')")
        box = page.locator(f"#picture-{n}").bounding_box()
        viewport = page.viewport_size
        assert box["width"] > width_in_page and box["width"] >= min(640, viewport["width"] - 32)
        assert 0 <= box["x"] and box["x"] + box["width"] <= viewport["width"] and 0 <= box["y"] < viewport["height"]
        assert page.evaluate(f"() => document.elementFromPoint({box['x'] + 5}, {box['y'] + 5}).id") == f"picture-{n}"
        # The close link covers the window behind the picture: a click beside it goes back.
        page.locator(f"#full-{n} > .close").click(position={"x": 3, "y": viewport["height"] - 3})
        assert page.evaluate("() => location.hash") == f"#picture-{n}"
        assert page.locator(f"#full-{n}").evaluate("zoom => getComputedStyle(zoom).position") != "fixed"
        assert page.locator(f"#picture-{n}").bounding_box()["width"] == pytest.approx(width_in_page, abs=1)
    finally:
        page.close()


# Broken copies of a real report page, each with what the checker must say about it. The
# paths are relative to the copy's folder, "report", and "report-elsewhere" is a sibling
# whose name starts the same (a prefix test of paths would take it for inside).
def _first_image(html: str, src: str) -> str:
    return re.sub(r'src="data:image/png;base64,[^"]*"', f'src="{src}"', html, count=1)


BROKEN = {
    "external image": (lambda html: _first_image(html, "https://example.com/x.png"),
                       ["request outside the report: https://example.com/x.png", "failed request: https://example.com/x.png",
                        "image not decoded"]),
    "broken data URI": (lambda html: _first_image(html, "data:image/png;base64,iVBORw0KGgoAAAAN"),
                        ["image not decoded"]),
    "a file outside the folder": (lambda html: _first_image(html, "../report-elsewhere/real.png"),
                                  ["request outside the report: file://"]),
    "a missing file in the folder": (lambda html: _first_image(html, "pictures/missing.png"),
                                     ["failed request: file://", "image not decoded"]),
    "a script that fails": (lambda html: html.replace("</body>", "<script>console.warn('careful'); console.error('boom'); null.x</script></body>"),
                            ["console warning: careful", "console error: boom", "page error: "]),
    "a stylesheet from the network": (
        lambda html: html.replace("</head>", '<link rel="stylesheet" href="http://cdn.example.org/x.css"></head>'),
        ["request outside the report: http://cdn.example.org/x.css", "failed request: http://cdn.example.org/x.css"]),
}


@pytest.mark.parametrize("breakage", list(BROKEN))
def test_the_check_rejects_a_broken_page(browser, pages, tmp_path, breakage):
    """A copy of the real report with one thing broken: the checker names it."""
    edit, expected = BROKEN[breakage]
    (tmp_path / "report-elsewhere").mkdir()
    write_image(tmp_path / "report-elsewhere" / "real.png")  # a file that loads fine, but not the report's
    folder = tmp_path / "report"
    (folder / "pictures").mkdir(parents=True)
    write_image(folder / "pictures" / "inside.png")
    html = (pages / "base" / "index.html").read_text(encoding="utf-8")
    # A picture inside the folder is fine (the check allows file: within it) and stays so.
    html = _first_image(html, "pictures/inside.png")
    (folder / "index.html").write_text(edit(html), encoding="utf-8")
    check, page = check_page(browser, folder / "index.html")
    page.close()
    problems = check.problems()
    print("\n".join(problems))
    for start in expected:
        assert any(problem.startswith(start) for problem in problems), (start, problems)
    # and nothing else (a resource that fails to load is also a console error): the
    # picture inside the folder was requested, loaded and decoded without a complaint.
    allowed = (*expected, "console error: Failed to load resource")
    assert [problem for problem in problems if not problem.startswith(allowed)] == []
    assert any(url.endswith("/report/pictures/inside.png") for url in check.requests)


# --- The folder layout (issue 11, "a report that scales"): a report made by hand, its
# records and PNG files (tests/test_report_layout.py), no TensorFlow and no run.

FOLDER_IMAGES = 200

# Lazy pictures (the class pages' thumbnails) load when scrolled to: load them all now.
LOAD_LAZY = """async () => {
  for (const img of document.images) img.loading = 'eager';
  await Promise.all(Array.from(document.images, img => img.decode().catch(() => null)));
}"""

# Elements reaching past the window's right edge (the page would scroll sideways), but
# inside a box that scrolls by itself (the summary's wide tables).
PAST_THE_RIGHT_EDGE = """() => Array.from(document.querySelectorAll('body *'))
  .filter(el => !el.closest('.scrolls') && el.getBoundingClientRect().right > innerWidth + 0.5)
  .map(el => el.tagName.toLowerCase() + (el.className ? '.' + el.className : '') + (el.id ? '#' + el.id : ''))"""


@pytest.fixture(scope="module")
def folder_report(browser, tmp_path_factory):
    """``report/``: a folder report of FOLDER_IMAGES images (4 pages of images, 7 classes),
    made only once a browser is there to open it."""
    from test_report_layout import make_report, write_pages

    root = tmp_path_factory.mktemp("folder-layout") / "report"
    root.mkdir()
    started = time.perf_counter()
    write_pages(make_report(root, FOLDER_IMAGES), root)
    print(f"{FOLDER_IMAGES} images: pages rendered and written in {time.perf_counter() - started:.2f} s")
    return root


def test_every_page_of_a_folder_report_opens_clean(browser, folder_report, record_property):
    """The summary and every page: no console error, no request leaving the folder, every
    picture a file of it that decodes (none inlined), no script; the summary loads fast."""
    names = check_every_page(browser, folder_report, record_property)
    assert names[0] == "index.html" and len([n for n in names if "/images-" in n]) == 4 and len(names) == 1 + 4 + 7


@pytest.mark.skipif(not os.environ.get("VIZKIT_BROWSER_REPORT"), reason="set VIZKIT_BROWSER_REPORT=DIR to check a real run's folder report")
def test_every_page_of_a_given_folder_report_opens_clean(browser, record_property):
    """The same check on a real run's report (benchmarks/README.md: the 2,000-image run)."""
    check_every_page(browser, Path(os.environ["VIZKIT_BROWSER_REPORT"]), record_property)


def check_every_page(browser, folder: Path, record_property) -> list[str]:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))
    for name in names:
        check, page = check_page(browser, folder / name, record=record_property)
        try:
            check.folder = folder.resolve()  # the pages under pages/ link to ../pictures
            page.evaluate(LOAD_LAZY)
            check.images = page.evaluate(INSPECT)["images"]
            assert check.problems() == [], name
            assert check.scripts == 0, name
            assert check.images and not [image for image in check.images if image["src"].startswith("data:")], name
            assert not [url for url in check.requests if url.startswith("data:")], name
            assert len(check.requests) == 1 + len({image["src"] for image in check.images}), name  # the page, its files
            if name == "index.html":
                print(f"summary: load event after {check.load_ms:.0f} ms")
                assert check.load_ms < 2000
                assert page.locator("svg.histogram g.bin").count() == 10
        finally:
            page.close()
    return names


@pytest.mark.parametrize("name", ["index.html", "pages/images-0001.html", "pages/class-0003.html"])
def test_a_folder_report_reads_on_a_phone_without_scrolling_sideways(browser, folder_report, name):
    page = browser.new_page(viewport={"width": 375, "height": 800})
    try:
        page.goto((folder_report / name).resolve().as_uri(), wait_until="load")
        assert page.evaluate(PAST_THE_RIGHT_EDGE) == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    finally:
        page.close()


@pytest.mark.parametrize("name", ["index.html", "pages/images-0004.html"])
def test_the_full_size_views_of_a_folder_report_show_their_pictures(browser, folder_report, name):
    """As on the one-page report: each picture that opens (not the thumbnails: they are
    links to the image's card) opens over the page, at least as large as its own pixels."""
    check, page = check_page(browser, folder_report / name)
    try:
        views = page.evaluate(FULL_SIZE_VIEWS)
        thumbnails = page.locator("a.thumb img").count()
        assert len(views) == len(check.images) - thumbnails > 0
        assert [view for view in views
                if not (view["target"] and view["position"] == "fixed" and view["on_top"]
                        and view["after"] + 0.5 >= max(view["before"], view["natural"], view["least"]))] == []
    finally:
        page.close()

CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
STRICT_HOST = "http://report.test"

# A page that breaks the policy: what the browser says then shows the policy is in force.
CSP_CONTROL = ('<!DOCTYPE html><html lang="en"><title>control</title><img alt="inlined" src="data:image/png;base64,'
               'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="></html>')


def _strictly_served(browser, folder: Path, url: str) -> tuple[list[str], list[str], list[dict]]:
    """Load ``url`` of STRICT_HOST, which serves the files of ``folder`` (and /control.html)
    with the CSP header, as a host that allows nothing else would (Playwright answers the
    requests: no server, no network). Returns the console's errors and warnings, the URLs
    requested and the page's images."""
    import mimetypes

    def serve(route):
        path = unquote(urlparse(route.request.url).path).lstrip("/")
        headers = {"Content-Security-Policy": CSP}
        if path == "control.html":
            return route.fulfill(body=CSP_CONTROL, content_type="text/html", headers=headers)
        file = (folder / path).resolve()
        if not (file.is_relative_to(folder.resolve()) and file.is_file()):
            return route.fulfill(status=404, body="", headers=headers)
        route.fulfill(body=file.read_bytes(), content_type=mimetypes.guess_type(file.name)[0], headers=headers)

    page = browser.new_page()
    console, requests = [], []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}") if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    page.on("request", lambda request: requests.append(request.url))
    page.route(f"{STRICT_HOST}/**", serve)
    try:
        page.goto(url, wait_until="load")
        page.evaluate(LOAD_LAZY)
        return console, requests, page.evaluate(INSPECT)["images"]
    finally:
        page.close()


@pytest.mark.parametrize("name", ["index.html", "pages/images-0001.html", "pages/class-0003.html"])
def test_a_folder_report_needs_nothing_a_strict_content_security_policy_refuses(browser, folder_report, name):
    console, _, _ = _strictly_served(browser, folder_report, f"{STRICT_HOST}/control.html")
    assert any("Content Security Policy" in line for line in console), console
    console, requests, images = _strictly_served(browser, folder_report, f"{STRICT_HOST}/{name}")
    assert console == []
    assert images and all(image["complete"] and image["natural_width"] > 0 for image in images)
    assert all(url.startswith(f"{STRICT_HOST}/") for url in requests), requests
