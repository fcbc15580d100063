"""How a folder report is cut into pages, and the prediction statistics of its summary.

A report in the folder layout is a summary (``index.html``) and pages under ``pages/``:
one per :data:`PAGE_SIZE` images in input order (``images-0001.html``: everything about
those images), and one per predicted class (``class-0007.html``: its images as
thumbnails, most confident first, each linking to its page). No Jinja, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vizkit.report import ImageRecord, Report

#: Images per page of a folder report, and the most a one-page report holds by default.
PAGE_SIZE = 50
#: Bins of the summary's confidence histogram (top-1 probability, 0 to 1).
HISTOGRAM_BINS = 10
#: Images shown as the most and as the least confident.
EXTREMES = 8
#: Failures listed by name on the summary (all of them are in report.json).
LISTED_FAILURES = 50


@dataclass
class Page:
    """A page of images: ``name`` its path in the report folder, ``number`` from 1."""

    name: str
    number: int
    images: list[ImageRecord]

    @property
    def title(self) -> str:
        return f"Page {self.number}: {self.images[0].id} … {self.images[-1].id}" if self.images else f"Page {self.number}"


@dataclass
class ClassPage:
    """The images whose top prediction is class ``index``, most confident first."""

    name: str
    index: int
    label: str | None
    images: list[ImageRecord]

    @property
    def mean_score(self) -> float:
        return sum(image.top["score"] for image in self.images) / len(self.images)

    @property
    def title(self) -> str:
        return f"{self.index} · {self.label}" if self.label else f"class {self.index}"


@dataclass
class Layout:
    """Everything the summary links to, and where each image lives."""

    pages: list[Page]
    classes: list[ClassPage]
    page_of: dict[str, str]  # image id → page name
    histogram: list[tuple[float, float, int]] = field(default_factory=list)  # (from, to, images)
    most: list[ImageRecord] = field(default_factory=list)
    least: list[ImageRecord] = field(default_factory=list)
    failed: list[ImageRecord] = field(default_factory=list)  # at most LISTED_FAILURES
    failed_count: int = 0


def layout_of(report: Report, page_size: int = PAGE_SIZE) -> Layout:
    images = report.images
    pages = [
        Page(f"pages/images-{n:04d}.html", n, images[start:start + page_size])
        for n, start in enumerate(range(0, len(images), page_size), 1)
    ]
    page_of = {image.id: page.name for page in pages for image in page.images}
    predicted = [image for image in images if image.top]
    by_class: dict[int, list[ImageRecord]] = {}
    for image in predicted:
        by_class.setdefault(image.top["index"], []).append(image)
    classes = [
        ClassPage(f"pages/class-{index:04d}.html", index, members[0].top["label"],
                  sorted(members, key=lambda image: -image.top["score"]))
        for index, members in sorted(by_class.items(), key=lambda item: (-len(item[1]), item[0]))
    ]
    counts = [0] * HISTOGRAM_BINS
    for image in predicted:
        counts[min(int(image.top["score"] * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    ranked = sorted(predicted, key=lambda image: (-image.top["score"], image.id))
    failed = [image for image in images if image.status == "error"]
    return Layout(
        pages, classes, page_of,
        histogram=[(n / HISTOGRAM_BINS, (n + 1) / HISTOGRAM_BINS, c) for n, c in enumerate(counts)],
        most=ranked[:EXTREMES],
        least=ranked[::-1][:EXTREMES] if len(ranked) > EXTREMES else [],
        failed=failed[:LISTED_FAILURES],
        failed_count=len(failed),
    )


def subset(report: Report, images: list[ImageRecord], index: dict | None = None) -> Report:
    """The report restricted to ``images``: their records, and each technique's
    artifacts, measurements and errors of them (the technique-wide ones belong to the
    summary). ``index``: :func:`by_image` of the report, for many subsets of one report."""
    index = index if index is not None else by_image(report)
    ids = [image.id for image in images]
    techniques = [
        dataclasses.replace(
            t, **{part: [item for image_id in ids for item in index[t.name][part].get(image_id, ())]
                  for part in ("artifacts", "evidence", "image_errors")},
        )
        for t in report.techniques
    ]
    return dataclasses.replace(report, images=list(images), techniques=techniques, sections=[])


def by_image(report: Report) -> dict[str, dict[str, dict[str, list]]]:
    """technique → artifacts / evidence / image_errors → image id → items, in order."""
    index: dict[str, dict[str, dict[str, list]]] = {}
    for t in report.techniques:
        parts = index[t.name] = {"artifacts": {}, "evidence": {}, "image_errors": {}}
        for part, items in (("artifacts", t.artifacts), ("evidence", t.evidence)):
            for item in items:
                if item.image_id is not None:
                    parts[part].setdefault(item.image_id, []).append(item)
        for error in t.image_errors:
            parts["image_errors"].setdefault(error["image_id"], []).append(error)
    return index
