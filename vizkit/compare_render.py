"""Writing a comparison (:mod:`vizkit.compare`) as ``index.html`` and ``compare.json``,
published whole like a run report (:mod:`vizkit.report_folder`). No TensorFlow here."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vizkit import report_folder
from vizkit.compare import Comparison, is_comparison_folder, to_json_bytes
from vizkit.render import Theme, _environment


def render_html(comparison: Comparison, held: list[str] | None = None) -> str:
    css = (resources.files("vizkit.templates") / "report.css").read_text(encoding="utf-8")
    template = _environment(Theme()).get_template("compare.html")
    return template.render(c=comparison.data, pictures=comparison.pictures, held=held, css=css)


def render_files(comparison: Comparison, held: list[str] | None = None) -> dict[str, bytes]:
    """The comparison's files, in memory: compare.json and index.html."""
    return {
        "compare.json": to_json_bytes(comparison.data),
        "index.html": render_html(comparison, held).encode("utf-8"),
    }


def claim(outdir: Path, overwrite: bool = False) -> report_folder.ReportFolder:
    """Claim ``outdir`` (see :func:`vizkit.report_folder.claim`); a folder holding an
    earlier comparison is replaced without ``overwrite``."""
    return report_folder.claim(outdir, overwrite=overwrite or is_comparison_folder(outdir))


def write(comparison: Comparison, folder: report_folder.ReportFolder, held: list[str] | None = None) -> Path:
    """Render, then publish into the claimed ``folder`` as a whole; the page's path."""
    return folder.publish(render_files(comparison, held))
