"""Writing a Report: ``report.json`` and ``arrays.npz``, and either one self-contained
``index.html`` (layout ``single``: pictures inlined as data URIs) or a summary page and
pages of images linking to the PNG files beside them (layout ``folder``; see
:mod:`vizkit.report_pages`).

Pillow, Jinja2 and NumPy only. The pages are rendered in memory, then the folder is
published whole (:mod:`vizkit.report_folder`): a failed or interrupted run leaves the
folder as it was, and a new report replaces an earlier one entirely.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import jinja2
import numpy as np

from vizkit import files as file_io, report_folder
from vizkit.npz import npy_bytes, write_npz
from vizkit.pictures import FOLDER, Picture, png_bytes
from vizkit.report import Report
from vizkit.report_pages import by_image, layout_of, subset

#: Pictures narrower than this are scaled up (nearest neighbour) by an integer factor.
MIN_DISPLAY_WIDTH = 320


def png_data_uri(picture: np.ndarray) -> str:
    """A PNG data URI; Pillow writes no time or text chunks, so equal pixels give equal bytes."""
    return _data_uri(png_bytes(picture))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass
class Sources:
    """Where a page's ``<img>`` finds a picture: inlined (``root`` holds the files of the
    report's :class:`Picture` objects) or, with ``base``, a link relative to the page."""

    root: Path | None = None
    base: str | None = None  # "" for index.html, "../" for pages/*.html; None: inline

    def __call__(self, picture) -> str:
        if not isinstance(picture, Picture):
            return png_data_uri(picture)  # an array (a plugin template's own picture)
        if self.base is not None:
            return self.base + picture.path
        if picture.png is not None:
            return _data_uri(picture.png)
        if self.root is None:
            raise ValueError(f"{picture.path}: the report's pictures are files; render it with their folder (root)")
        return _data_uri((self.root / picture.path).read_bytes())


def display_width(picture: np.ndarray) -> int:
    width = picture.shape[1]
    return width * max(1, -(-MIN_DISPLAY_WIDTH // width))


#: The report's line colours, by the names a metric's Curve may use (report.css has each
#: as ``--c-NAME``, lighter in dark mode).
PALETTE = {"red": "#d62728", "blue": "#1f77b4", "green": "#2ca02c", "orange": "#ff7f0e", "purple": "#9467bd", "gray": "#7f7f7f"}


def chart_lines(curves: list, width: int = 200, height: int = 64) -> list[dict]:
    """SVG polylines of a measurement's curves, x evenly spaced from 0 to 1 across
    ``width``, y on one scale spanning [0, 1] and every value (probabilities fill it)."""
    values = [v for curve in curves for v in curve.values]
    low, high = min(0.0, *values), max(1.0, *values)
    lines = []
    for index, curve in enumerate(curves):
        last = len(curve.values) - 1
        points = " ".join(
            f"{i * width / last:.1f},{height - (v - low) / (high - low) * height:.1f}" for i, v in enumerate(curve.values)
        )
        name = curve.color if curve.color in PALETTE else list(PALETTE)[index % len(PALETTE)]
        lines.append({"points": points, "color": PALETTE[name], "name": name, "dashed": curve.dashed, "label": curve.label})
    return lines


class PictureIds:
    """The ids of a page's full-size views: 1, 2, …; ``reset()`` starts a page again."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n

    def reset(self) -> None:
        self.n = 0


@dataclass
class Theme:
    """What plugins add to the page: CSS after vizkit's, template folders searched first."""

    css: list[str] = field(default_factory=list)
    template_dirs: list[Path] = field(default_factory=list)


def _environment(theme: Theme, sources: Sources | None = None) -> jinja2.Environment:
    builtin = jinja2.FileSystemLoader(str(resources.files("vizkit.templates")))
    env = jinja2.Environment(
        # A plugin's report.html shadows vizkit's; "vizkit/report.html" still reaches the original.
        loader=jinja2.ChoiceLoader(
            [jinja2.FileSystemLoader([str(d) for d in theme.template_dirs]),
             jinja2.PrefixLoader({"vizkit": builtin}),
             builtin]
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["png"] = sources or Sources()
    env.filters["display_width"] = display_width
    env.filters["chart_lines"] = chart_lines
    # The ids of a page's full-size views (pictures.html) count from 1, the same on
    # every rerun: a fresh environment per page, or reset() before each.
    env.globals["picture_ids"] = PictureIds()
    return env


def inert_css(text: str) -> str:
    """A plugin's CSS that cannot end the page's ``<style>`` element: ``</style`` (any
    case) becomes ``<\\/style``, so ``</style><script>`` stays text inside the stylesheet."""
    return re.sub(r"</(?=style)", r"<\\/", text, flags=re.IGNORECASE)


def _css(theme: Theme) -> str:
    css = (resources.files("vizkit.templates") / "report.css").read_text(encoding="utf-8")
    return "\n".join([css, *map(inert_css, theme.css)])


def render_html(report: Report, theme: Theme | None = None, root: Path | None = None) -> str:
    """The one-page report; ``root``: the folder holding its pictures' files."""
    theme = theme or Theme()
    return _environment(theme, Sources(root)).get_template("report.html").render(report=report, css=_css(theme))


def render_pages(report: Report, theme: Theme | None = None, page_report=None) -> dict[str, str]:
    """The folder layout's pages, name → HTML (:func:`iter_pages`, all at once)."""
    return dict(iter_pages(report, theme, page_report))


def iter_pages(report: Report, theme: Theme | None = None, page_report=None) -> Iterator[tuple[str, str]]:
    """The folder layout's pages, (name, HTML) one after the other: ``index.html`` (the
    summary) and the pages of images and of classes under ``pages/``, linking to the
    pictures' files.
    One environment per kind of page (compiling the templates per page costs ~0.1 s),
    its full-size views counted afresh for each page. ``page_report(report, images)``:
    the report of a page's images (default :func:`report_pages.subset`; a streamed run's
    writer reads their results back from disk)."""
    theme = theme or Theme()
    css, layout = _css(theme), layout_of(report)

    def template(base: str, name: str):
        env = _environment(theme, Sources(base=base))
        compiled = env.get_template(name)

        def render(**context) -> str:
            env.globals["picture_ids"].reset()
            return compiled.render(css=css, layout=layout, **context)

        return render

    summary, images, classes = template("", "summary.html"), template("../", "page.html"), template("../", "class.html")
    yield "index.html", summary(report=report)
    if page_report is None:
        index = by_image(report)

        def page_report(report: Report, images: list) -> Report:
            return subset(report, images, index)

    for number, page in enumerate(layout.pages):
        yield page.name, images(
            report=page_report(report, page.images), page=page,
            previous=layout.pages[number - 1] if number else None,
            next=layout.pages[number + 1] if number + 1 < len(layout.pages) else None,
        )
    for klass in layout.classes:
        yield klass.name, classes(report=report, klass=klass)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    stream = io.BytesIO()
    write_npz(stream, ((key, npy_bytes(array)) for key, array in arrays.items()))
    return stream.getvalue()


class ReportTooLarge(ValueError):
    """The rendered report is larger than ``--max-report-mb`` allows: nothing was written.
    ``size`` and ``limit`` in bytes."""

    def __init__(self, size: int, limit: int, files: dict[str, int]):
        self.size, self.limit, self.files = size, limit, files
        parts = ", ".join(f"{name} {n / MB:.2f} MB" for name, n in sorted(files.items()))
        super().__init__(
            f"the report would be {size / MB:.2f} MB ({parts}), over --max-report-mb {limit / MB:g}: "
            "nothing was written; raise --max-report-mb, or make it smaller: fewer images or techniques "
            "(-t), no --save-arrays, fewer layers of the feature-map techniques"
        )


#: A megabyte as ``--max-report-mb`` counts it (10**6 bytes, as file managers show sizes).
MB = 1_000_000


def check_size(files: dict[str, bytes], max_bytes: int | None, written: dict[str, int] | None = None) -> None:
    """ReportTooLarge when the files together, and those ``written`` already (name →
    bytes), exceed ``max_bytes`` (None: no limit)."""
    sizes = {name: len(data) for name, data in files.items()} | (written or {})
    if max_bytes is not None and sum(sizes.values()) > max_bytes:
        if len(sizes) > 4:  # a folder report: pages and pictures by kind
            kinds: dict[str, int] = {}
            for name, size in sizes.items():
                kind = name.split("/")[0] if "/" in name else name
                kinds[kind] = kinds.get(kind, 0) + size
            sizes = kinds
        raise ReportTooLarge(sum(sizes.values()), max_bytes, sizes)


def render_files(report: Report, theme: Theme | None = None, root: Path | None = None, page_report=None) -> dict[str, bytes]:
    """The report's files, rendered in memory: name → bytes. ``root``: the folder where
    the run wrote its pictures (and ``arrays.npz``, and ``report.json`` where it is there
    already), into which a folder report's pages under ``pages/`` are written as they are
    rendered, one in memory at a time; without it, the pictures are arrays and
    ``arrays.npz`` is made here, when the report saves arrays. ``page_report``: as
    :func:`render_pages`'."""
    files = {}
    if root is None or not (root / "report.json").is_file():
        files["report.json"] = (json.dumps(report.to_json(), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    if report.layout == "folder":
        if root is not None:  # the pages of images go to the disk as they are made; the summary is published last
            shutil.rmtree(root / "pages", ignore_errors=True)  # of an attempt that failed
        for name, html in iter_pages(report, theme, page_report):
            if root is None or name == "index.html":
                files[name] = html.encode("utf-8")
            else:
                (root / name).parent.mkdir(exist_ok=True)
                file_io.write_new(root / name, html.encode("utf-8"))
    else:
        files["index.html"] = render_html(report, theme, root).encode("utf-8")
    if report.arrays_saved and root is None:
        files["arrays.npz"] = _npz_bytes(report.arrays())
    return files


def write(report: Report, outdir: Path | report_folder.ReportFolder, theme: Theme | None = None,
          max_bytes: int | None = None, staged: Path | None = None, drop: tuple[str, ...] = (),
          page_report=None) -> Path:
    """Write the report into ``outdir``, as a whole; returns the path of index.html.

    Everything is rendered first (in memory, or, for a run's pages of images, into
    ``staged``), then published: the folder ends up holding
    exactly this report (an earlier report's ``arrays.npz`` goes too), or, on any
    failure (a full disk: ``report_folder.ReportNotWritten``; Ctrl-C), stays as it was.
    ``outdir`` is a folder a run claimed before its work (``report_folder.claim``), or a
    path, claimed here: a folder holding files vizkit did not write, or one another run
    is writing, is then refused (``report_folder.FolderRefused``). ``max_bytes``: the
    largest the files may be together; larger, :class:`ReportTooLarge` and nothing written.
    """
    files = render_files(report, theme, staged, page_report)
    if report.layout == "single":
        drop = (*drop, FOLDER)  # the page holds the pictures
    written = {}
    if staged is not None:
        written = {
            name: p.stat().st_size for p in staged.rglob("*")
            if p.is_file() and (name := p.relative_to(staged).as_posix()).split("/")[0] not in drop
        }
    check_size(files, max_bytes, written)
    if isinstance(outdir, report_folder.ReportFolder):
        return outdir.publish(files, staged, drop)
    with report_folder.claim(Path(outdir)) as folder:
        return folder.publish(files, staged, drop)
