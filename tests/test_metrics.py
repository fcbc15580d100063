"""The metric host: plugins measure every comparable technique's heatmaps, the report shows it.

The built-in metrics have their own tests (test_faithfulness, test_randomization); these
use small third-party metrics to pin down what the host promises any metric.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import vizkit
from vizkit import Column, Curve, Measurement, Metric, host, kit

NO_BUILTIN_METRICS = ("--disable-plugin", "vizkit.plugins.faithfulness", "--disable-plugin", "vizkit.plugins.randomization")


class Peak:
    """Per image: the map's brightest fraction; per technique: a warning for methods whose
    name is in ``suspicious``. Records what it was called with."""

    def __init__(self, suspicious=("gradcampp",)):
        self.suspicious = suspicious
        self.calls = []

    def evaluate(self, context, explanation):
        self.calls.append((explanation.technique.name, context.params["level"], [a.image_id for a in explanation.artifacts]))
        found = []
        for image, artifact in explanation.pairs(context.images):
            share = float((kit.explanation_map(artifact.array) >= context.params["level"]).mean())
            found.append(Measurement(
                {"share": share}, image.id, caption=f"share <b>{share:.2f}</b>",
                curves=(Curve("up <i>", np.linspace(0, 1, 5), "red"), Curve("down", np.linspace(1, 0, 5), dashed=True)),
            ))
        warned = explanation.technique.name in self.suspicious
        found.append(Measurement({"rank": len(explanation.technique.name)}, None, "whole",
                                 warning="<script>alert(1)</script> looks like noise" if warned else None))
        context.note("level is a fraction of the peak")
        return found

    @vizkit.hookimpl
    def register_metrics(self, register):
        register(Metric(
            "peak", "The share of pixels above a level.", self.evaluate,
            columns=(Column("share", "share above level", "lower"), Column("rank", "name length")),
            options=(vizkit.Option("level", float, 0.5, "fraction of the peak", minimum=0, maximum=1),),
        ))


class Broken:
    @staticmethod
    def evaluate(context, explanation):
        if explanation.technique.name == "gradcam":
            raise RuntimeError("cannot measure gradcam")
        return [Measurement({"ok": 1.0}, None)]

    @vizkit.hookimpl
    def register_metrics(self, register):
        register(Metric("broken", "Fails on Grad-CAM.", self.evaluate, columns=(Column("ok", "ok"),)))


def _run(vizkit_cli, model_file, images, out, *args):
    return vizkit_cli("run", model_file, images, "-o", out, *NO_BUILTIN_METRICS, *args)


def test_each_heatmap_gets_its_evidence_and_the_report_a_summary(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    peak = Peak()
    vizkit_plugin(peak, name="peakplugin")
    out = tmp_path / "out"
    result = _run(vizkit_cli, vizkit_model_file, vizkit_images, out, "-t", "gradcam", "-t", "gradcampp",
                  "-t", "activations", "-s", "activations.layers=conv1", "-s", "peak.level=0.25")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    images = [image["id"] for image in report["images"]]
    # called once per comparable technique, with its artifacts and the metric's options
    assert peak.calls == [("gradcam", 0.25, images), ("gradcampp", 0.25, images)]
    gradcam = next(t for t in report["techniques"] if t["name"] == "gradcam")
    per_image = [m for m in gradcam["evidence"] if m["image_id"] is not None]
    assert [m["image_id"] for m in per_image] == images
    assert all(m["metric"] == "peak" and 0 <= m["values"]["share"] <= 1 for m in per_image)
    assert per_image[0]["curves"][0] == {"label": "up <i>", "values": [0.0, 0.25, 0.5, 0.75, 1.0], "color": "red", "dashed": False}
    assert not next(t for t in report["techniques"] if t["name"] == "activations")["evidence"]

    (metric,) = report["metrics"]
    assert metric["name"] == "peak" and metric["params"] == {"level": 0.25} and metric["errors"] == []
    assert metric["notes"] == ["level is a fraction of the peak"]  # said once, not once per technique
    summary = {row["technique"]: row for row in report["summary"]}
    assert set(summary) == {"gradcam", "gradcampp"}
    for name, row in summary.items():
        shares = [m["values"]["share"] for t in report["techniques"] if t["name"] == name for m in t["evidence"] if m["image_id"]]
        assert row["values"]["peak"]["share"] == pytest.approx(np.mean(shares), abs=1e-6)
        assert row["values"]["peak"]["rank"] == len(name)  # the technique-level value, not a mean
        assert row["images"] == len(images)
    assert summary["gradcampp"]["warnings"] == ["<script>alert(1)</script> looks like noise"]
    assert summary["gradcam"]["warnings"] == [] and summary["gradcam"]["checked"]
    # sorted by the first column with a direction, lower first
    shares = [row["values"]["peak"]["share"] for row in report["summary"]]
    assert shares == sorted(shares)

    html = (out / "index.html").read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; looks like noise" in html
    assert "share &lt;b&gt;" in html and "up &lt;i&gt;" in html
    view = html[html.index('<section id="comparison">') : html.index('<section id="evidence">')]
    for image in images:
        row = view[view.index(f'id="compare-{image}"') :]
        row = row[: row.index('<div class="comparison-row"')] if '<div class="comparison-row"' in row else row
        assert row.count("<svg") == 2  # one chart under each of the two heatmaps
        points = re.findall(r'<polyline points="([^"]+)"', row)[0].split()
        assert points[0] == "0.0,64.0" and points[-1] == "200.0,0.0"  # 0 → bottom left, 1 → top right
    table = html[html.index('<table class="summary">') : html.index("</table>", html.index('<table class="summary">'))]
    assert table.index("technique-gradcam") != -1 and 'class="flagged"' in table
    section = html[html.index('id="technique-gradcampp"') :]
    assert "⚠ peak: &lt;script&gt;" in section[: section.index("</section>")]


def test_a_failing_metric_costs_only_its_own_numbers(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Broken(), name="brokenplugin")
    vizkit_plugin(Peak(), name="peakplugin")
    out = tmp_path / "out"
    result = _run(vizkit_cli, vizkit_model_file, vizkit_images, out, "-t", "gradcam", "-t", "gradcampp")
    assert result.exit_code == 1, result.output  # written, but a part failed
    report = json.loads((out / "report.json").read_text())
    broken = next(m for m in report["metrics"] if m["name"] == "broken")
    assert [e["technique"] for e in broken["errors"]] == ["gradcam"]
    assert "RuntimeError: cannot measure gradcam" in broken["errors"][0]["error"]
    gradcam = next(t for t in report["techniques"] if t["name"] == "gradcam")
    assert {m["metric"] for m in gradcam["evidence"]} == {"peak"}  # the other metric still measured it
    assert gradcam["status"] == "ok"
    assert "Metric broken failed on" in (out / "index.html").read_text()


def test_metric_selection_and_options(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    peak = Peak()
    vizkit_plugin(peak, name="peakplugin")
    vizkit_plugin(Broken(), name="brokenplugin")
    base = ("-t", "gradcam")
    result = _run(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "a", *base, "-m", "peak")
    assert result.exit_code == 0, result.output
    assert [m["name"] for m in json.loads((tmp_path / "a" / "report.json").read_text())["metrics"]] == ["peak"]

    result = _run(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "b", *base, "--no-metrics")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert result.exit_code == 0 and report["metrics"] == [] and report["summary"] == []
    assert 'id="evidence"' not in (tmp_path / "b" / "index.html").read_text()

    for args, message in [
        (("-m", "peek"), "no metric 'peek'; installed: peak"),
        (("-m", "peak", "--no-metrics"), "contradict"),
        (("-m", "peak", "-s", "peak.level=2"), "peak.level: '2' is above the maximum 1"),
        (("-m", "peak", "-s", "peak.lvl=0.1"), "peak has no option 'lvl'"),
        (("-m", "broken", "-s", "peak.level=0.1"), "no technique or metric 'peak' is selected"),
    ]:
        result = _run(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "c", *base, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert not (tmp_path / "c").exists()
    assert len(peak.calls) == 1  # only the first run measured anything

    # no comparable technique: nothing to measure, no summary, no error
    result = _run(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path / "d", "-t", "activations", "-s", "activations.layers=conv1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "report.json").read_text())["metrics"] == []


def test_listing_and_name_clashes(vizkit_plugin, vizkit_cli, vizkit_host):
    vizkit_plugin(Peak(), name="peakplugin")
    result = vizkit_cli("metrics", "peak")
    assert result.exit_code == 0
    assert "peak (peakplugin): The share of pixels above a level." in result.output
    assert "-s peak.level=<float>  fraction of the peak [default: 0.5; at least 0; at most 1]" in result.output
    plugins = {p["name"]: p for p in host.describe_plugins(vizkit_host())}
    assert plugins["peakplugin"]["metrics"] == ["peak"]

    class Clash:
        @vizkit.hookimpl
        def register_metrics(self, register):
            register(Metric("gradcam", "Named like a technique.", lambda context, explanation: []))

    vizkit_plugin(Clash(), name="clash")
    with pytest.raises(host.PluginError, match="'gradcam' is both a technique and a metric"):
        host.metrics(vizkit_host())


def test_measurements_are_checked_where_they_are_made():
    with pytest.raises(ValueError, match="value 'auc' is nan"):
        Measurement({"auc": float("nan")})
    with pytest.raises(TypeError, match=r"test_metrics.py:\d+.*picture must be uint8"):
        Measurement({"auc": 0.5}, picture=np.zeros((4, 4), "float32"))
    with pytest.raises(TypeError, match="values must map names to numbers"):
        Measurement({"auc": "high"})
    with pytest.raises(ValueError, match="at least two finite values"):
        Curve("flat", [0.5])
    with pytest.raises(ValueError, match="color 'pink'"):
        Curve("pink", [0, 1], color="pink")
    with pytest.raises(ValueError, match="better must be"):
        Column("auc", "AUC", "smaller")
    with pytest.raises(TypeError, match="metric name 'a.b'"):
        Metric("a.b", "dotted", lambda context, explanation: [])
    assert Measurement({"n": np.int64(3)}).values == {"n": 3.0}
    metric = Metric("m", "returns junk", lambda context, explanation: ["junk"])
    with pytest.raises(TypeError, match="metric m returned a str, not a vizkit Measurement"):
        metric.measure(None, None)


def test_spearman_and_ssim_against_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.random((9, 7))
    b = np.round(rng.random((9, 7)), 1)  # many ties
    ranks = lambda x: np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])  # noqa: E731
    ra, rb = ranks(a.ravel()), ranks(b.ravel())
    assert kit.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    assert kit.spearman(a, 3 * a + 1) == pytest.approx(1.0)
    assert kit.spearman(a, -a) == pytest.approx(-1.0)
    assert kit.spearman(a, np.ones_like(a)) == 0.0
    assert kit.ssim(a, a) == pytest.approx(1.0)
    assert kit.ssim(a, 5 * a + 2) == pytest.approx(1.0)  # each map is scaled to [0, 1] first
    assert kit.ssim(a, 1 - a) < 0
    with pytest.raises(ValueError):
        kit.ssim(a, a[:3])


def test_text_fields_and_extreme_curves_are_refused_where_made():
    """Else a plugin's bytes caption or an overflowing curve would fail the report's writing."""
    with pytest.raises(TypeError, match="caption must be a str"):
        Measurement({"a": 1.0}, caption=b"bytes")
    with pytest.raises(TypeError, match="warning must be a str or None"):
        Measurement({"a": 1.0}, warning=3)
    with pytest.raises(TypeError, match="curve label"):
        Curve(b"label", (0, 1))
    with pytest.raises(ValueError, match="within"):
        Curve("huge", (1e308, -1e308))


def test_metric_options_are_checked_even_when_no_technique_needs_them():
    from vizkit.runner import RunOptions, plan

    planned = plan(RunOptions(techniques=["activations"], metrics=["faithfulness"], settings={"faithfulness": {"steps": "8"}}))
    assert planned.metrics == [] and planned.params["faithfulness"]["steps"] == 8
