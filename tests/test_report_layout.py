"""The folder layout of a report (issue 11, "a report that scales"): a summary page
(``index.html``) and pages of images and of classes, pictures as PNG files beside them.

The reports here are made by hand (records and real PNG files, no TensorFlow, no run):
every picture a page shows is a file of the folder, no page holds a ``data:`` URI, every
link reaches a page and an element of it, and the summary's numbers (class counts and
mean confidences, the confidence histogram, the most and least confident images) are
those of the images given.
"""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from vizkit import render, report_pages
from vizkit.metric import Column, Curve
from vizkit.pictures import Picture
from vizkit.report import ArtifactRecord, ImageRecord, MeasurementRecord, MetricRecord, Report, TechniqueRecord

HOSTILE_LABEL = "<script>alert('label')</script>"
HOSTILE_PATH = 'photos/"><img src=x onerror=alert(1)>&amp;.png'
#: (class index, label) the images are predicted as, in turn; one label is hostile.
CLASSES = [(3, "tabby cat"), (7, "espresso"), (11, HOSTILE_LABEL), (12, 'rocket & "launch"'),
           (20, None), (281, "tabby, tabby cat"), (999, "toilet tissue")]
#: Images of make_report(…, broken=True) the technique "broken" fails on.
BROKEN_ERRORS = 30


def _picture(root: Path, pixels: np.ndarray, *parts: str) -> Picture:
    """A picture of the report, its PNG written under ``root`` as a run writes it."""
    picture = Picture.of(pixels, *parts)
    path = root / picture.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(picture.png)
    return picture.written()


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_report(root: Path, count: int, *, failed: int = 3, classes=CLASSES, broken: bool = True,
                metrics: bool = True, layout: str = "folder", arrays: bool = False) -> Report:
    """A report of ``count`` images (the last ``failed`` of them undecodable), its pictures
    written under ``root/pictures``: a comparable heatmap technique with per-image evidence
    (charts) and a technique-wide warning, a feature-map technique (two pictures an image),
    a technique of technique-wide pictures (filter grids) and, with ``broken``, one that
    failed on :data:`BROKEN_ERRORS` images. ``arrays``: pictures as arrays (a one-page
    report as plugins' templates may still make it) instead of files."""
    rng = np.random.default_rng(count)

    def picture(pixels, *parts):
        return pixels if arrays else _picture(root, pixels, *parts)

    images = []
    for i in range(count):
        image_id = f"img{i:04d}"
        if i >= count - failed:
            images.append(ImageRecord(image_id, f"photos/{image_id}.jpg", "0" * 64, "error",
                                      error=f"cannot identify image file {image_id}.jpg"))
            continue
        index, label = classes[i % len(classes)]
        top = round(float(rng.uniform(0.05, 1.0)), 6)
        others = [(c, lab) for c, lab in classes if c != index][:2]
        predictions = [{"index": index, "label": label, "score": top}] + [
            {"index": c, "label": lab, "score": round(top * (1 - top) / (n + 2), 6)} for n, (c, lab) in enumerate(others)]
        shape = (24 + i % 3 * 8, 32, 3)  # not all the same aspect
        images.append(ImageRecord(image_id, HOSTILE_PATH if i == 1 else f"photos/{image_id}.png", f"{i:064x}", "ok",
                                  warnings=["converted from grayscale"] if i == 2 else [],
                                  predictions=predictions, picture=picture(_pixels(i, shape), "inputs", image_id)))
    ok = [image for image in images if image.status == "ok"]
    curves = [Curve("deletion", (1.0, 0.6, 0.3, 0.1), "red"), Curve("insertion", (0.1, 0.4, 0.7, 0.9), "blue", dashed=True)]
    gradcam = TechniqueRecord(
        "gradcam", "vizkit", "Grad-CAM heatmaps.", "ok", {"layer": "conv2"}, comparable=True, duration_s=1.5,
        artifacts=[ArtifactRecord(f"gradcam of {image.id}", picture(_pixels(1000 + n, (16, 16, 3)), "gradcam", image.id),
                                  None, image.id, "conv2", "class 3", f"gradcam/{image.id}")
                   for n, image in enumerate(ok)],
        evidence=[MeasurementRecord("faithfulness", {"deletion": 0.2, "insertion": 0.6}, image.id, "AUC", curves)
                  for image in ok] * metrics
        + [MeasurementRecord("randomization", {"similarity": 0.8}, None, "whole", warning="barely changes",
                             picture=picture(_pixels(4000, (10, 10, 3)), "randomization", "gradcam", "all"))] * metrics,
    )
    activations = TechniqueRecord(
        "activations", "vizkit", "Feature maps.", "ok", {"max_channels": 4},
        artifacts=[ArtifactRecord(f"{layer} of {image.id}", picture(_pixels(2000 + n, (8, 12)), "activations", image.id, layer),
                                  None, image.id, layer, "4 channels", f"activations/{image.id}/{layer}")
                   for n, image in enumerate(ok) for layer in ("conv1", "conv2")],
    )
    filters = TechniqueRecord(
        "filters", "vizkit", "Filter patterns.", "ok", {"count": 4},
        artifacts=[ArtifactRecord(f"filters of {layer}", picture(_pixels(3000 + n, (20, 20, 3)), "filters", layer),
                                  None, None, layer, "gradient ascent", f"filters/{layer}")
                   for n, layer in enumerate(["conv1", "conv2"])],
    )
    techniques = [gradcam, activations, filters]
    if broken:
        techniques.append(TechniqueRecord(
            "broken", "example", "Fails.", "partial", {}, error=f"failed on {BROKEN_ERRORS} image(s)",
            image_errors=[{"image_id": image.id, "error": f"boom on {image.id}", "traceback": "x.py:1 in f\nValueError"}
                          for image in ok[:BROKEN_ERRORS]]))
    return Report(
        vizkit_version="0.2.0", created="2024-01-01T00:00:00Z",
        model={"name": "tiny", "source": "tiny.keras", "sha256": "ab" * 32, "input_shape": [None, 32, 32, 3],
               "output_shape": [None, 1000], "layers": 7, "preprocess": "none", "preprocess_reason": "test",
               "labels": "imagenet"},
        images=images, techniques=techniques,
        skipped_files=[{"path": "notes.txt", "path_bytes": None, "reason": "not an image"}],
        environment={"python": "3.12", "keras": "3"},
        plugins=[{"name": "vizkit", "version": "0.2.0", "origin": "builtin", "techniques": ["gradcam"], "model_loaders": [], "status": "ok", "error": None}],
        metrics=[MetricRecord("faithfulness", "vizkit", "Deletion and insertion.", {},
                              [Column("deletion", "deletion AUC", "lower"), Column("insertion", "insertion AUC", "higher")]),
                 MetricRecord("randomization", "vizkit", "Sanity check.", {}, [Column("similarity", "similarity", "lower")])]
        if metrics else [],
        layout=layout,
    )


def write_pages(report: Report, root: Path) -> dict[str, str]:
    """The folder layout's pages rendered and written under ``root``, beside its pictures."""
    pages = render.render_pages(report)
    for name, html in pages.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(html, encoding="utf-8")
    return pages


# --- reading the pages back ---------------------------------------------------------


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict
    children: list = dataclasses.field(default_factory=list)

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def all(self, tag: str | None = None, **attrs) -> list[Node]:
        """The elements under this one (depth first), of ``tag``, whose attributes include
        ``attrs`` (``class_`` matches one of the classes)."""
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and all(
                    value in child.attrs.get("class", "").split() if key == "class_" else child.attrs.get(key) == value
                    for key, value in attrs.items()
                ):
                    found.append(child)
                found.extend(child.all(tag, **attrs))
        return found

    def one(self, tag: str | None = None, **attrs) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class _Tree(HTMLParser):
    VOID = {"img", "meta", "br", "hr", "link", "input", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.open[-1].children.append(node)
        if tag not in self.VOID:
            self.open.append(node)

    def handle_startendtag(self, tag, attrs):
        self.open[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if any(node.tag == tag for node in self.open[1:]):
            while self.open.pop().tag != tag:
                pass

    def handle_data(self, data):
        self.open[-1].children.append(data)


def parse(html: str) -> Node:
    tree = _Tree()
    tree.feed(html)
    tree.close()
    return tree.root


def page_of(index: int) -> str:
    """The page of the image at ``index`` (input order), as report_pages names it."""
    return f"pages/images-{index // report_pages.PAGE_SIZE + 1:04d}.html"


def words(node: Node) -> str:
    return " ".join(node.text().split())


# --- the tests ------------------------------------------------------------------------

COUNT = 120  # three pages of images: 50, 50, 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder report of COUNT images (3 failed) written under its folder: (root, report,
    page name → parsed page)."""
    root = tmp_path_factory.mktemp("layout")
    report = make_report(root, COUNT)
    pages = write_pages(report, root)
    return root, report, {name: parse(html) for name, html in pages.items()}


def test_the_folder_has_a_summary_and_pages_of_images_and_of_classes(folder):
    root, report, pages = folder
    predicted = {image.top["index"] for image in report.images if image.top}
    assert sorted(pages) == sorted(["index.html", *(page_of(i) for i in range(0, COUNT, 50)),
                                    *(f"pages/class-{index:04d}.html" for index in predicted)])
    # The summary is no page of images: no card, and none of the pictures of each image
    # but the thumbnails; each page has the cards of its images, and no summary parts.
    summary = pages["index.html"]
    assert summary.all("article") == [] and summary.all(id="model") and summary.all(id="environment")
    for n, start in enumerate(range(0, COUNT, 50), 1):
        page = pages[f"pages/images-{n:04d}.html"]
        ids = [image.id for image in report.images[start:start + 50]]
        assert [card.attrs["id"] for card in page.all("article", class_="card")] == [f"image-{i}" for i in ids]
        assert not page.all(id="model") and not page.all(id="environment") and not page.all(id="evidence")


def test_every_picture_is_a_file_of_the_folder_and_no_page_inlines_one(folder):
    """No data: URI anywhere (a strict Content-Security-Policy serves the folder), every
    <img> a relative link to a PNG file inside the folder, and every picture written shown."""
    root, report, pages = folder
    shown = set()
    for name, page in pages.items():
        html = (root / name).read_text(encoding="utf-8")
        assert "data:" not in html, name
        assert "<script" not in html.lower(), name
        images = page.all("img")
        assert images, name  # thumbnails on the summary and the class pages, cards on the pages
        for img in images:
            src = img.attrs["src"]
            parts = urlsplit(src)
            assert not parts.scheme and not parts.netloc and not src.startswith("/"), (name, src)
            file = ((root / name).parent / unquote(parts.path)).resolve()
            assert file.is_relative_to(root.resolve()) and file.is_file(), (name, src)
            assert file.read_bytes().startswith(b"\x89PNG"), (name, src)
            shown.add(file.relative_to(root.resolve()).as_posix())
    assert shown == {p.relative_to(root).as_posix() for p in (root / "pictures").rglob("*.png")}


def test_every_link_reaches_a_page_of_the_folder_and_an_element_of_it(folder):
    root, report, pages = folder
    ids = {}
    for name, page in pages.items():
        found = [node.attrs["id"] for node in page.all() if "id" in node.attrs]
        assert len(found) == len(set(found)), (name, sorted({i for i in found if found.count(i) > 1}))
        ids[name] = set(found)
    linked = set()
    for name, page in pages.items():
        for a in page.all("a"):
            href = a.attrs["href"]
            parts = urlsplit(href)
            assert not parts.scheme and not parts.netloc, (name, href)
            target = name if not parts.path else ((root / name).parent / unquote(parts.path)).resolve().relative_to(root.resolve()).as_posix()
            assert target in pages, (name, href)
            assert not parts.fragment or unquote(parts.fragment) in ids[target], (name, href)
            if name == "index.html":
                linked.add(target)
    assert linked == set(pages)  # the summary reaches every page


def test_the_summary_counts_each_class_with_its_mean_confidence(folder):
    root, report, pages = folder
    expected: dict[int, list[float]] = {}
    for image in report.images:
        if image.status == "ok":
            expected.setdefault(image.predictions[0]["index"], []).append(image.predictions[0]["score"])
    rows = pages["index.html"].one("table", class_="classes").one("tbody").all("tr")
    found = [(a.attrs["href"], int(words(count)), words(mean)) for a, count, mean in
             ((row.one("a"), *row.all("td")[1:]) for row in rows)]
    order = sorted(expected, key=lambda index: (-len(expected[index]), index))
    assert found == [(f"pages/class-{index:04d}.html", len(expected[index]), f"{np.mean(expected[index]):.3f}")
                     for index in order]
    assert sum(count for _, count, _ in found) == COUNT - 3


def test_each_class_page_shows_its_images_most_confident_first_linking_to_their_cards(folder):
    root, report, pages = folder
    for index, label in CLASSES:
        members = sorted(((image.top["score"], n, image) for n, image in enumerate(report.images)
                          if image.top and image.top["index"] == index), key=lambda item: -item[0])
        page = pages[f"pages/class-{index:04d}.html"]
        assert words(page.one("h1")) == (f"{index} · {label}" if label else f"class {index}")
        thumbs = page.one(id="images").all("a", class_="thumb")
        assert [a.attrs["href"] for a in thumbs] == [
            f"{page_of(n).split('/')[-1]}#image-{image.id}" for _, n, image in members]
        assert [words(a.one("span", class_="score")) for a in thumbs] == [f"{score:.3f}" for score, _, _ in members]
        assert f"mean confidence {np.mean([score for score, _, _ in members]):.3f}" in words(page.one("header"))


def test_the_histogram_counts_the_top_confidence_of_every_predicted_image(folder):
    root, report, pages = folder
    expected = [0] * 10
    for image in report.images:
        if image.top:
            expected[min(int(image.top["score"] * 10), 9)] += 1
    svg = pages["index.html"].one("svg", class_="histogram")
    assert svg.attrs["role"] == "img"
    bins = svg.all("g", class_="bin")
    titles = [words(g.one("title")) for g in bins]
    assert titles == [f"{n / 10:.1f}–{(n + 1) / 10:.1f}: {count} image(s)" for n, count in enumerate(expected)]
    assert svg.attrs["aria-label"].endswith("; ".join(f"{n / 10:.1f}–{(n + 1) / 10:.1f}: {c}" for n, c in enumerate(expected)))
    heights = [float(g.one("rect", class_="bar").attrs["height"]) for g in bins]
    assert heights == pytest.approx([100 * count / max(expected) for count in expected], abs=0.05)
    assert sum(expected) == COUNT - 3


def test_the_most_and_least_confident_images_link_to_their_cards(folder):
    root, report, pages = folder
    ranked = sorted((image.top["score"], n, image.id) for n, image in enumerate(report.images) if image.top)
    summary = pages["index.html"]
    for heading, expected in [("most-confident", ranked[::-1][:8]), ("least-confident", ranked[:8])]:
        thumbs = summary.one("ul", **{"aria-labelledby": heading}).all("a", class_="thumb")
        assert [a.attrs["href"] for a in thumbs] == [f"{page_of(n)}#image-{image_id}" for _, n, image_id in expected]
        assert [words(a.one("span", class_="score")) for a in thumbs] == [f"{score:.3f}" for score, _, _ in expected]
        assert all(a.one("img").attrs["width"] == "120" for a in thumbs)


def test_a_hostile_label_and_path_stay_text(folder):
    root, report, pages = folder
    for name, page in pages.items():
        assert not page.all("script"), name
        assert not [node for node in page.all() if any(key.startswith("on") for key in node.attrs)], name
    summary = (root / "index.html").read_text(encoding="utf-8")
    assert "11 · &lt;script&gt;alert(&#39;label&#39;)&lt;/script&gt;" in summary
    assert words(pages["pages/class-0011.html"].one("h1")) == f"11 · {HOSTILE_LABEL}"
    card = pages[page_of(1)].one("article", id="image-img0001")
    assert words(card.one("p", class_="path")) == HOSTILE_PATH
    assert card.one("img").attrs["alt"] == f"input image {HOSTILE_PATH}"


def test_each_page_links_to_the_previous_and_the_next(folder):
    root, report, pages = folder
    names = [f"images-{n:04d}.html" for n in (1, 2, 3)]
    for n, name in enumerate(names):
        page = pages[f"pages/{name}"]
        pagers = page.all("nav", class_="pager")
        assert len(pagers) == 2  # at the top and at the bottom
        for pager in pagers:
            assert [a.attrs["href"] for a in pager.all("a", rel="prev")] == (names[n - 1:n] if n else [])
            assert [a.attrs["href"] for a in pager.all("a", rel="next")] == names[n + 1:n + 2]
        assert words(page.one("h1")).startswith(f"Page {n + 1}: ")
        assert f"page {n + 1} of 3" in words(page.one("p", class_="crumbs"))


def test_links_to_a_technique_lead_to_the_summary_from_the_pages(folder):
    """The summary describes each technique; a page's links to one go there, and its
    links to an image stay on the page (the card)."""
    root, report, pages = folder
    page = pages[page_of(0)]
    techniques = {a.attrs["href"] for a in page.all("a") if "#technique-" in a.attrs["href"]}
    assert techniques == {"../index.html#technique-gradcam", "../index.html#technique-broken",
                          "../index.html#technique-activations", "#technique-activations"}
    assert all(a.attrs["href"].startswith("#image-") for a in page.one(id="comparison").all("a")
               if "image" in a.attrs["href"])


def test_the_summary_shows_technique_wide_pictures_and_caps_the_errors(folder):
    root, report, pages = folder
    summary = pages["index.html"]
    filters = summary.one("section", id="technique-filters")
    assert [img.attrs["src"] for img in filters.all("img")] == ["pictures/filters/conv1.png", "pictures/filters/conv2.png"]
    for name, count in [("gradcam", COUNT - 3), ("activations", 2 * (COUNT - 3))]:
        section = summary.one("section", id=f"technique-{name}")
        assert section.all("img") == []
        assert f"{count} picture(s), per image, are on the pages" in words(section)
    broken = summary.one("section", id="technique-broken")
    errors = [li for li in broken.one("div", class_="error-box").one("ul").children if isinstance(li, Node)]
    assert [words(li.one("a")) for li in errors] == [f"img{i:04d}" for i in range(20)]
    assert f"and {BROKEN_ERRORS - 20} more in report.json" in words(broken)
    # Every image's pictures are on its page, and only there.
    for n in (1, 2, 3):
        page = pages[f"pages/images-{n:04d}.html"]
        ids = [image.id for image in report.images[(n - 1) * 50:n * 50] if image.status == "ok"]
        srcs = [img.attrs["src"] for img in page.all("img")]
        assert sorted({s for s in srcs if "/gradcam/" in s}) == sorted(f"../pictures/gradcam/{i}.png" for i in ids)
        assert sorted(s for s in srcs if "/activations/" in s) == sorted(
            f"../pictures/activations/{i}/{layer}.png" for i in ids for layer in ("conv1", "conv2"))
        assert not [s for s in srcs if "/filters/" in s]


def test_failed_images_are_listed_up_to_a_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(report_pages, "LISTED_FAILURES", 2)
    report = make_report(tmp_path, 8, failed=5, broken=False, metrics=False)
    summary = parse(render.render_pages(report)["index.html"])
    box = summary.one("div", id="failed-images")
    assert [a.attrs["href"] for a in box.all("a")] == ["pages/images-0001.html#image-img0003",
                                                       "pages/images-0001.html#image-img0004"]
    assert "5 image(s) could not be read" in words(box)
    assert words(box).endswith("and 3 more in report.json")


def test_the_class_table_is_capped_and_every_class_keeps_its_page(tmp_path):
    classes = [(index, f"label {index}") for index in range(105)]
    report = make_report(tmp_path, 105, failed=0, classes=classes, broken=False, metrics=False)
    pages = render.render_pages(report)
    summary = parse(pages["index.html"])
    assert len(summary.one("table", class_="classes").one("tbody").all("tr")) == 100
    assert "and 5 more classes" in words(summary.one(id="predictions"))
    assert len(summary.one("ul", class_="page-list").all("a")) == 105 == len([n for n in pages if "/class-" in n])
    assert summary.all("ul", **{"aria-labelledby": "least-confident"})


def test_the_one_page_report_still_uses_the_shared_macros(tmp_path):
    """report.html takes its macros from macros.html: charts and full-size views as before."""
    report = make_report(tmp_path, 4, failed=1, layout="single", arrays=True)
    html = render.render_html(report)
    page = parse(html)
    assert len(page.all("svg", class_="chart")) == 3  # one chart per image explained
    assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in page.all("img"))
    assert len(page.all("span", class_="zoom")) == len(page.all("img")) == 3 + (3 + 3) + 6 + 2 + 1  # cards, side by side, activations, filters, evidence


def test_written_with_its_pictures_the_pages_show_the_files_report_json_names(tmp_path):
    """render.write publishes the pages beside the pictures a run staged; report.json names
    each picture by the same path the pages link to."""
    staged = tmp_path / "staged"
    staged.mkdir()
    report = make_report(staged, 60)
    index = render.write(report, tmp_path / "out", staged=staged)
    out = index.parent
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    named = {image["picture"] for image in data["images"] if image["picture"]} | {
        a["picture"] for t in data["techniques"] for a in t["artifacts"]} | {
        m["picture"] for t in data["techniques"] for m in t["evidence"] if m["picture"]}
    shown = set()
    for page in out.rglob("*.html"):
        for img in parse(page.read_text(encoding="utf-8")).all("img"):
            shown.add((page.parent / img.attrs["src"]).resolve().relative_to(out.resolve()).as_posix())
    assert shown == named and all((out / name).is_file() for name in named)


def test_a_card_links_its_class_and_says_what_failed_on_its_image(folder):
    root, report, pages = folder
    page = pages[page_of(0)]
    card = page.one("article", id="image-img0000")
    assert [a.attrs["href"] for a in card.one("ol", class_="predictions").all("a")] == ["class-0003.html"]
    assert "broken failed on it: boom on img0000" in words(card)
    assert "failed on it" not in words(page.one("article", id=f"image-img{BROKEN_ERRORS:04d}"))
    failed = pages[page_of(COUNT - 1)].one("article", id=f"image-img{COUNT - 1:04d}")
    assert "error" in failed.attrs["class"].split() and not failed.all("img") and not failed.all("ol")
