"""The comparison view: every comparable technique's heatmap per image, side by side; ``-t explain``."""

from __future__ import annotations

import json
import re


import vizkit
from vizkit import Artifact, Technique, host, kit


class Brightness:
    """A comparable technique of a third party: the image's brightness as a 'heatmap'."""

    @staticmethod
    def run_batch(context, batch):
        maps = kit.normalize_heatmap(batch.pixels.mean(axis=-1))
        return [
            Artifact(f"{image.id} · bright<ness>", heatmap, kit.heatmap_picture(image.display, heatmap, {"alpha": 0.4, "overlay": "add", "colormap": "jet"}), image_id=image.id)
            for image, heatmap in zip(batch.images, maps)
        ]

    @vizkit.hookimpl
    def register_techniques(self, register):
        register(Technique("brightness", run_batch=self.run_batch, description="mean of the channels", comparable=True))


def test_explain_selects_every_comparable_technique(vizkit_plugin, vizkit_host):
    vizkit_plugin(Brightness(), name="bright")
    available = host.techniques(vizkit_host())
    chosen = [r.technique.name for r in host.select(available, ["activations", "explain"])]
    assert chosen[0] == "activations"
    assert set(chosen[1:]) == {name for name, r in available.items() if r.technique.comparable} >= {"gradcam", "brightness"}
    assert "activations" not in chosen[1:] and "filters" not in chosen


def test_one_row_per_image_with_each_comparable_heatmap(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    vizkit_plugin(Brightness(), name="bright")
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "gradcam", "-t", "brightness", "-t", "activations",
                        "-s", "activations.layers=conv1", "-o", out, env={"VIZKIT_LOAD_PLUGINS": ""})
    assert result.exit_code == 0, result.output
    html = (out / "index.html").read_text()
    report = json.loads((out / "report.json").read_text())
    assert {t["name"]: t["comparable"] for t in report["techniques"]} == {"gradcam": True, "brightness": True, "activations": False}

    view = html[html.index('<section id="comparison">') : html.index('id="technique-gradcam"')]
    rows = re.findall(r'<div class="comparison-row" id="compare-([^"]+)">(.*?)(?=<div class="comparison-row"|</section>)', view, re.S)
    assert [image for image, _ in rows] == [image["id"] for image in report["images"]]
    for image, row in rows:
        names = re.findall(r'<a href="#technique-([^"]+)">', row)
        assert names == ["gradcam", "brightness"]  # in the order they ran
        assert f"{image} · bright&lt;ness&gt;" in row  # escaped
        assert len(re.findall(r'<img [^>]*width="200"', row)) == 3  # the photo and two heatmaps, one size
    # comparable techniques' sections point to the view instead of repeating the pictures
    gradcam = html[html.index('id="technique-gradcam"') : html.index('id="technique-brightness"')]
    assert 'href="#comparison"' in gradcam and "<img" not in gradcam
    activations = html[html.index('id="technique-activations"') :]
    assert activations.count("<img") == 3


def test_no_comparison_view_without_comparable_techniques(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "activations", "-s", "activations.layers=conv1", "-o", out)
    assert result.exit_code == 0, result.output
    assert 'id="comparison"' not in (out / "index.html").read_text()
