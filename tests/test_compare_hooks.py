"""The ``register_comparisons`` hook: a plugin's comparison metric in ``vizkit compare``
(compare.json, the page, ``--fail-on``), and a raising one isolated."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

import vizkit
from test_compare import reports  # noqa: F401  (the module-scoped pair of real tiny reports)
from vizkit import ComparisonMetric, ExitCode
from vizkit.compare import CompareError, parse_condition

HOSTILE = '<b>"mean</b>&abs'


def _plugin(*metrics):
    @vizkit.hookimpl
    def register_comparisons(register):
        for metric in metrics:
            register(metric)

    return types.SimpleNamespace(register_comparisons=register_comparisons)


def mean_abs(base, new):
    assert base.shape == new.shape and base.ndim == 2
    return float(np.abs(new - base).mean())


def _compare(vizkit_cli, reports, tmp_path, *extra, out="out"):  # noqa: F811
    result = vizkit_cli("compare", reports["base"], reports["new"], "-o", tmp_path / out, *extra)
    folder = tmp_path / out
    data = json.loads((folder / "compare.json").read_text()) if (folder / "compare.json").exists() else None
    return result, data, folder


def test_a_plugin_metric_is_measured_shown_and_escaped(vizkit_plugin, vizkit_cli, reports, tmp_path):  # noqa: F811
    vizkit_plugin(_plugin(ComparisonMetric("mean_abs", HOSTILE, mean_abs, better="lower")), name="absdiff")
    result, data, folder = _compare(vizkit_cli, reports, tmp_path)
    assert result.exit_code == ExitCode.OK, result.output
    assert {"name": "mean_abs", "description": HOSTILE, "better": "lower", "plugin": "absdiff"} in data["comparisons"]
    assert {m["name"] for m in data["comparisons"]} == {"mean_abs", "spearman", "ssim"}  # the built-ins stay
    (gradcam,) = data["similarity"]
    summary = gradcam["metrics"]["mean_abs"]
    values = [pair["metrics"]["mean_abs"] for pair in gradcam["pairs"]]
    assert summary["compared"] == 2 and all(v is not None and v >= 0 for v in values)
    assert summary["mean"] == pytest.approx(np.mean(values), abs=1e-6)
    assert summary["worst"] == pytest.approx(max(values))  # better lower: the worst is the highest
    assert data["errors"] == []
    page = (folder / "index.html").read_text()
    assert "mean mean_abs" in page and "highest mean_abs" in page
    assert HOSTILE not in page and "&lt;b&gt;&#34;mean&lt;/b&gt;&amp;abs" in page
    assert "mean_abs" in result.output  # the terminal summary


def test_fail_on_a_plugin_metric(vizkit_plugin, vizkit_cli, reports, tmp_path):  # noqa: F811
    vizkit_plugin(_plugin(ComparisonMetric("mean_abs", "mean absolute difference", mean_abs, better="lower")), name="absdiff")
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "--fail-on", "mean_abs>0", out="held")
    assert result.exit_code == ExitCode.FAILURES, result.output
    assert "--fail-on mean_abs>0: gradcam mean mean_abs" in result.output
    result, _, _ = _compare(vizkit_cli, reports, tmp_path, "--fail-on", "gradcam.mean_abs>1000", out="within")
    assert result.exit_code == ExitCode.OK, result.output
    # The direction follows `better`, and unknown names are usage errors naming the metrics.
    for wrong in ("mean_abs<0.5", "nothing<0.5"):
        result, _, _ = _compare(vizkit_cli, reports, tmp_path, "--fail-on", wrong, out="bad")
        assert result.exit_code == ExitCode.USAGE_ERROR, result.output
        assert "mean_abs>X" in result.output and "ssim<X" in result.output
    # The built-in SSIM is usable the same way.
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "--fail-on", "ssim<1.01", out="ssim")
    assert result.exit_code == ExitCode.FAILURES and "gradcam mean SSIM" in result.output


def test_a_raising_metric_costs_only_its_own_numbers(vizkit_plugin, vizkit_cli, reports, tmp_path):  # noqa: F811
    def broken(base, new):
        raise RuntimeError("<boom>")

    vizkit_plugin(_plugin(ComparisonMetric("broken", "raises", broken)), name="breaks")
    result, data, folder = _compare(vizkit_cli, reports, tmp_path)
    assert result.exit_code == ExitCode.OK, result.output  # no --fail-on on it: the exit status is unchanged
    assert data["errors"] == ["plugin breaks, comparison broken: RuntimeError: <boom>"]
    assert "vizkit: plugin breaks, comparison broken" in result.output
    (gradcam,) = data["similarity"]
    assert gradcam["metrics"]["broken"] == {"mean": None, "worst": None, "compared": 0}
    assert gradcam["mean_spearman"] is not None and gradcam["metrics"]["ssim"]["mean"] is not None
    assert "&lt;boom&gt;" in (folder / "index.html").read_text()
    # A threshold on it cannot pass silently.
    result, _, _ = _compare(vizkit_cli, reports, tmp_path, "--fail-on", "broken<0.5", out="held")
    assert result.exit_code == ExitCode.FAILURES
    assert "broken<0.5: no broken to test" in result.output


def test_the_built_ins_can_be_left_out(vizkit_cli, reports, tmp_path):  # noqa: F811
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "--disable-plugin", "vizkit.plugins.comparisons")
    assert result.exit_code == ExitCode.OK, result.output
    assert data["comparisons"] == [] and data["similarity"][0]["mean_spearman"] is None
    result, _, _ = _compare(vizkit_cli, reports, tmp_path, "--disable-plugin", "vizkit.plugins.comparisons",
                            "--fail-on", "similarity<0.5", out="bad")
    assert result.exit_code == ExitCode.USAGE_ERROR


def test_a_local_plugin_file(vizkit_cli, reports, tmp_path):  # noqa: F811
    plugin = tmp_path / "corr_plugin.py"
    plugin.write_text(
        "import numpy as np\nimport vizkit\n\n"
        "@vizkit.hookimpl\n"
        "def register_comparisons(register):\n"
        "    register(vizkit.ComparisonMetric('overlap', 'shared mass of the two maps',\n"
        "        lambda b, n: float(np.minimum(b, n).sum() / max(np.maximum(b, n).sum(), 1e-9))))\n"
    )
    result, data, _ = _compare(vizkit_cli, reports, tmp_path, "-p", plugin, "--fail-on", "gradcam.overlap<1.5")
    assert result.exit_code == ExitCode.FAILURES, result.output
    assert data["similarity"][0]["metrics"]["overlap"]["compared"] == 2


@pytest.mark.parametrize("kwargs", [
    {"name": "Bad-Name"}, {"name": "flips"}, {"name": "similarity"}, {"better": "up"}, {"compare": 3},
])
def test_metric_fields_are_checked(kwargs):
    fields = {"name": "ok", "description": "d", "compare": mean_abs, **kwargs}
    with pytest.raises((ValueError, TypeError)):
        ComparisonMetric(**fields)


def test_parse_condition_against_given_metrics():
    metrics = {"dist": (ComparisonMetric("dist", "d", mean_abs, better="lower"), "p")}
    assert parse_condition("gradcam.dist>0.2", metrics).technique == "gradcam"
    with pytest.raises(CompareError):
        parse_condition("similarity<0.5", metrics)  # no spearman among these
