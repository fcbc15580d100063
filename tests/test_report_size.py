"""Report size: the documented budget per image, and ``vizkit run --max-report-mb N``,
which fails the run (exit 2, nothing written) when the rendered report is larger."""

from __future__ import annotations

import shutil

from vizkit import ExitCode
from vizkit.demo import METRICS, SETTINGS
from vizkit.render import MB
from vizkit.runner import RunOptions, run
from vizkit.samples import sample_photos

#: The budgets README's Outputs section states, for the demo's techniques and metrics.
BUDGET_PER_IMAGE = 3 * MB
BUDGET_FIXED = 8 * MB

LIGHT = ["-t", "gradcam", "--no-metrics", "-q"]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_report_over_the_limit_is_not_written(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    out = tmp_path / "report"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-o", out, *LIGHT, "--max-report-mb", "0.001")
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "over --max-report-mb 0.001" in result.output and "nothing was written" in result.output
    assert "index.html" in result.output and " MB" in result.output  # names the size, file by file
    assert not out.exists()

    # An earlier report in the folder stays as it was.
    env = {"SOURCE_DATE_EPOCH": "0"}
    assert vizkit_cli("run", vizkit_model_file, vizkit_images, "-o", out, *LIGHT, env=env).exit_code == 0
    before = _files(out)
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-o", out, *LIGHT, "--max-report-mb", "0.001", env=env)
    assert result.exit_code == ExitCode.USAGE_ERROR
    assert _files(out) == before

    # Within the limit the report is the same, byte for byte.
    again = tmp_path / "again"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-o", again, *LIGHT, "--max-report-mb", "100", env=env)
    assert result.exit_code == ExitCode.OK, result.output
    assert _files(again) == before


def test_the_limit_must_be_positive(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-o", tmp_path / "r", *LIGHT, "--max-report-mb", "0")
    assert result.exit_code == ExitCode.USAGE_ERROR


def test_the_budget_per_image_holds_on_a_demo_like_report(vizkit_model, tmp_path):
    """The demo's techniques and metrics (on the tiny test model) for 1 and 3 photos."""
    sizes = {}
    for count in (1, 3):
        images = tmp_path / f"images{count}"
        images.mkdir()
        for photo in sample_photos()[:count]:
            shutil.copy(photo, images / photo.name)
        options = RunOptions(techniques=list(SETTINGS), metrics=list(METRICS), reproducible=True)
        run(vizkit_model, [images], options, tmp_path / f"report{count}")
        sizes[count] = sum(len(data) for data in _files(tmp_path / f"report{count}").values())
    per_image = (sizes[3] - sizes[1]) / 2
    assert 0 < per_image <= BUDGET_PER_IMAGE, per_image
    assert sizes[1] - per_image <= BUDGET_FIXED, sizes
