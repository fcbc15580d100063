"""What readers see (issue 11): the page follows a dark or light preference, every picture
opens at full size without JavaScript, heatmaps are alpha-blended over the photo by
default, and the sample photos inside the package show a short path."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import vizkit
from conftest import build_tiny
from vizkit import compare_render, render
from vizkit.compare import compare, load_report
from vizkit.plugins.gradcam import TECHNIQUE as GRADCAM
from vizkit.runner import RunOptions, run
from vizkit.safe_read import path_bytes, report_path
from vizkit.samples import sample_photos

CSS = (resources.files("vizkit.templates") / "report.css").read_text(encoding="utf-8")
PACKAGE_DATA = Path(vizkit.__file__).parent / "data"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real run on the package's own data folder (its three sample photos, and two
    text files it skips), with a heatmap technique, a metric (charts) and saved arrays."""
    out = tmp_path_factory.mktemp("view") / "report"
    options = RunOptions(techniques=["activations", "gradcam"], metrics=["faithfulness"],
                         settings={"faithfulness": {"steps": 4}, "activations": {"max_channels": 4}},
                         reproducible=True, save_arrays=True)
    report, _ = run(build_tiny(), [PACKAGE_DATA], options, out)
    return SimpleNamespace(folder=out, report=report)


class Elements(HTMLParser):
    """Every start tag as (tag, attributes, the elements it sits in, outermost first)."""

    VOID = {"img", "meta", "br", "hr", "link", "input", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, dict, list[tuple[str, dict]]]] = []
        self.open: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.found.append((tag, attributes, list(self.open)))
        if tag not in self.VOID:
            self.open.append((tag, attributes))

    def handle_startendtag(self, tag, attrs):  # <rect ... />
        self.found.append((tag, dict(attrs), list(self.open)))

    def handle_endtag(self, tag):
        if any(name == tag for name, _ in self.open):
            while self.open.pop()[0] != tag:
                pass


def elements(html: str) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    parser = Elements()
    parser.feed(html)
    return parser.found


def check_full_size_views(html: str) -> int:
    """Every <img> opens at full size through a :target view; returns how many there are."""
    found = elements(html)
    ids = [attributes["id"] for _, attributes, _ in found if "id" in attributes]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    pictures = [(attributes, parents) for tag, attributes, parents in found if tag == "img"]
    assert pictures
    for attributes, parents in pictures:
        (link_tag, link), (wrapper_tag, wrapper) = parents[-1], parents[-2]
        assert link_tag == "a" and wrapper_tag == "span" and "zoom" in wrapper["class"].split()
        assert link["href"] == "#" + wrapper["id"] and re.fullmatch(r"full-\d+", wrapper["id"])
        closing = [a for tag, a, p in found if tag == "a" and a.get("class") == "close" and p and p[-1][1] is wrapper]
        assert [a["href"] for a in closing] == ["#" + attributes["id"]]  # back to the picture
    # Each picture's bytes appear once: as many data URIs as pictures.
    assert html.count("data:image/png;base64,") == len(pictures)
    return len(pictures)


# -- dark mode -------------------------------------------------------------------------


def _variables(block: str) -> set[str]:
    return set(re.findall(r"(--[\w-]+)\s*:", block))


def test_the_css_follows_a_dark_preference_and_defines_every_variable_it_uses():
    assert re.search(r":root\s*{[^}]*color-scheme:\s*light dark", CSS)
    light = _variables(CSS[: CSS.index("@media (prefers-color-scheme: dark)")])
    dark_block = re.search(r"@media \(prefers-color-scheme: dark\)\s*{\s*:root\s*{([^}]*)}\s*}", CSS)
    assert dark_block, "no :root block for dark mode"
    dark = _variables(dark_block.group(1))
    used = set(re.findall(r"var\((--[\w-]+)\)", CSS))
    assert used <= light and used <= dark, (used - light, used - dark)
    # Past the variables no colour is written out, but in the full-size view (dark in both modes).
    rules = re.sub(r"\.zoom:target[^{]*{[^}]*}", "", CSS[dark_block.end():])
    assert not re.findall(r"#[0-9a-fA-F]{3,8}\b|\brgba?\(", rules)
    assert light == dark  # each mode sets every variable


def test_every_part_of_the_report_uses_the_page_colours(made):
    html = (made.folder / "index.html").read_text(encoding="utf-8")
    assert CSS in html
    # the charts' frames and lines take the page's colours, light or dark
    assert re.search(r'<rect class="frame"', html)
    lines = re.findall(r'<polyline points="[^"]+" class="c-(\w+)"', html)
    assert lines and set(lines) <= {"red", "blue", "green", "orange", "purple", "gray"}
    for name in set(lines):
        assert f".c-{name} {{" in CSS and f"--c-{name}:" in CSS
    # no inline colour a dark page cannot restyle
    assert 'style="color:' not in html
    compared = compare(load_report(made.folder), load_report(made.folder))
    page = compare_render.render_html(compared)
    assert CSS in page and "@media (prefers-color-scheme: dark)" in page


# -- full-size pictures ----------------------------------------------------------------


def test_every_picture_opens_at_full_size_without_javascript(made):
    html = (made.folder / "index.html").read_text(encoding="utf-8")
    assert "<script" not in html
    count = check_full_size_views(html)
    assert count >= 3 + 3 + 3  # the photos, the side-by-side row's photos and heatmaps, at least
    assert re.search(r"\.zoom:target\s*{[^}]*position:\s*fixed", CSS)
    assert re.search(r"\.zoom > \.close\s*{\s*display:\s*none", CSS)
    assert re.search(r"\.zoom:target > \.close\s*{[^}]*display:\s*flex", CSS)


def test_the_comparison_pictures_open_at_full_size_too(made):
    compared = compare(load_report(made.folder), load_report(made.folder))
    page = compare_render.render_html(compared)
    assert "<script" not in page
    assert check_full_size_views(page) == 3 * len(compared.pictures) > 0


def test_the_ids_of_the_full_size_views_are_the_same_on_every_render(made):
    first = render.render_html(made.report)
    ids = re.findall(r'id="(full-\d+)"', first)
    assert ids and ids == [f"full-{n}" for n in range(1, len(ids) + 1)]  # counted from 1 on each page
    assert render.render_html(made.report) == first == (made.folder / "index.html").read_text(encoding="utf-8")
    loaded = load_report(made.folder)
    comparison = compare(loaded, loaded)
    assert compare_render.render_html(comparison) == compare_render.render_html(comparison)


# -- the overlay -----------------------------------------------------------------------


def _jet(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    resized = cv2.resize(heatmap, (width, height))
    return cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * resized), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype("float32")


def test_heatmaps_are_alpha_blended_over_the_photo_by_default(vizkit_context):
    params = GRADCAM.resolve_params({})
    assert params["overlay"] == "blend"
    context = vizkit_context(GRADCAM)
    artifact = GRADCAM.apply(context)[0]
    photo = context.images[0].display.astype("float32")
    height, width = photo.shape[:2]
    colored = _jet(artifact.array, height, width)
    expected = np.clip(0.5 * photo + 0.5 * colored, 0, 255)
    row, col = height // 2, width // 3
    assert np.abs(artifact.picture[row, col].astype(int) - expected[row, col]).max() <= 1
    assert np.abs(artifact.picture.astype(int) - expected).max() <= 1


def test_overlay_add_is_the_chapters_picture(vizkit_context):
    context = vizkit_context(GRADCAM, {"overlay": "add"})
    assert context.params["alpha"] is None  # the default, 0.4 for add
    artifact = GRADCAM.apply(context)[0]
    photo = context.images[0].display.astype("float32")
    expected = np.clip(_jet(artifact.array, *photo.shape[:2]) * 0.4 + photo, 0, 255)
    assert np.abs(artifact.picture.astype(int) - expected).max() <= 1
    # alpha given: used as is, in either mode
    given = GRADCAM.apply(vizkit_context(GRADCAM, {"alpha": 0.25}))[0]
    expected = np.clip(0.75 * photo + 0.25 * _jet(given.array, *photo.shape[:2]), 0, 255)
    assert np.abs(given.picture.astype(int) - expected).max() <= 1


def test_the_overlay_options_say_which_is_the_default():
    options = {o.name: o for o in GRADCAM.options}
    assert options["overlay"].default == "blend" and "add" in options["overlay"].choices
    assert "chapter" in options["overlay"].help and "blend" in options["overlay"].help
    assert "0.5" in options["alpha"].help and "0.4" in options["alpha"].help


# -- short paths of the package's files ------------------------------------------------


def test_files_inside_the_package_show_a_short_path(made):
    data = json.loads((made.folder / "report.json").read_text(encoding="utf-8"))
    assert [i["path"] for i in data["images"]] == [f"vizkit/data/samples/{p.name}" for p in sorted(sample_photos())]
    assert all(i["path_bytes"] is None for i in data["images"])
    assert {"vizkit/data/README.md", "vizkit/data/imagenet_classes.txt"} <= {f["path"] for f in data["skipped_files"]}
    html = (made.folder / "index.html").read_text(encoding="utf-8")
    assert "<code>vizkit/data/samples/chelsea.jpg</code>" in html
    assert str(PACKAGE_DATA) not in html and str(PACKAGE_DATA) not in json.dumps(data)


def test_report_path_shortens_only_the_packages_files(tmp_path, monkeypatch):
    photo = sample_photos()[0]
    assert report_path(photo) == f"vizkit/data/samples/{photo.name}"
    assert report_path(str(photo).encode()) == f"vizkit/data/samples/{photo.name}"
    plugin = Path(vizkit.plugins.__file__).parent / "gradcam.py"
    assert report_path(plugin) == "vizkit/plugins/gradcam.py"
    # anything else as given, escaped as display_path does
    assert report_path(tmp_path / "cat.jpg") == str(tmp_path / "cat.jpg")
    assert report_path("photos/cat.jpg") == "photos/cat.jpg"
    beside = str(Path(vizkit.__file__).parent) + "-other/x.jpg"  # a folder whose name starts the same
    assert report_path(beside) == beside
    odd = Path(vizkit.__file__).parent / "data" / "caf\udce9\x1b.jpg"
    assert report_path(odd) == "vizkit/data/caf\\xe9\\x1b.jpg"
    assert bytes.fromhex(path_bytes(odd)) == bytes(odd)  # the exact name is kept, in full
    # a relative name that leads into the package, too
    monkeypatch.chdir(PACKAGE_DATA)
    assert report_path(Path("samples") / photo.name) == f"vizkit/data/samples/{photo.name}"


def test_a_plugin_template_shows_pictures_with_the_same_macro(made, tmp_path):
    (tmp_path / "report.html").write_text(
        '{% extends "vizkit/report.html" %}{% from "vizkit/pictures.html" import picture %}'
        '{% block footer %}<footer>{{ picture(report.images[0].picture, 100, "ours") }}</footer>{% endblock %}',
        encoding="utf-8",
    )
    html = render.render_html(made.report, render.Theme(template_dirs=[tmp_path]))
    assert 'alt="ours"' in html
    check_full_size_views(html)
