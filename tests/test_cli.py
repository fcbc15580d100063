"""The ``vizkit`` command end to end: real tiny Keras models, real image files, no mocks."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import build_nested, build_tiny, write_sample_folder
from vizkit import images as image_io
from vizkit.cli import main

#: Keeps every technique to well under a second on the tiny model.
CHEAP = [
    "-s", "filters.count=4",
    "-s", "filters.steps=3",
    "-s", "filters.size=32",
    "-s", "activations.max_channels=8",
]
#: The techniques a run without -t uses: the chapter's three (the other built-ins are opt-in).
BUILTINS = {"activations", "filters", "gradcam"}


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def pictures(workdir):
    return write_sample_folder(workdir / "pictures")


@pytest.fixture(scope="module")
def full_run(workdir, model_file, pictures):
    """All three techniques with --save-arrays: (result, outdir, report.json data)."""
    outdir = workdir / "full"
    result = invoke("run", model_file, pictures, "-o", outdir, "--save-arrays", *CHEAP)
    data = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    return result, outdir, data


# -- helpers -----------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def tags_of(html: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser.tags


def assert_self_contained(html: str) -> None:
    tags = tags_of(html)
    assert "script" not in {tag for tag, _ in tags}
    assert not re.search(r"<script", html, re.IGNORECASE)
    for tag, attrs in tags:
        for name in ("src", "href"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, name, value)
        if tag == "link":
            assert (attrs.get("rel") or "").lower() != "stylesheet", attrs
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?\s*(?:https?:)?//", html, re.IGNORECASE)
    imgs = [attrs for tag, attrs in tags if tag == "img"]
    assert imgs, "the report shows no pictures"
    for attrs in imgs:
        assert (attrs.get("alt") or "").strip(), attrs
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert picture.format == "PNG"


def technique(data: dict, name: str) -> dict:
    (record,) = [t for t in data["techniques"] if t["name"] == name]
    return record


# -- vizkit run: the report --------------------------------------------------


def test_run_writes_self_contained_report_and_json(full_run, model_file, pictures):
    result, outdir, data = full_run
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(outdir / "index.html")
    assert sorted(p.name for p in outdir.iterdir()) == ["arrays.npz", "index.html", "report.json"]

    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert_self_contained(html)

    assert data["vizkit_version"]
    model = data["model"]
    assert model["name"] == "tiny"
    assert model["source"] == str(model_file)
    assert re.fullmatch(r"[0-9a-f]{64}", model["sha256"])
    assert model["input_shape"] == [32, 32, 3]

    assert [image["id"] for image in data["images"]] == ["a", "b"]
    for image in data["images"]:
        assert set(image) >= {"id", "path", "sha256", "status", "error", "warnings", "predictions"}
        assert image["status"] == "ok" and image["error"] is None
        assert Path(image["path"]).parent == pictures
        assert re.fullmatch(r"[0-9a-f]{64}", image["sha256"])
        assert image["warnings"] == []

    assert {t["name"] for t in data["techniques"]} == BUILTINS
    for record in data["techniques"]:
        assert set(record) >= {"name", "plugin", "status", "error", "duration_s", "params", "artifacts"}
        assert record["status"] == "ok" and record["error"] is None
        assert record["plugin"] == f"vizkit.plugins.{record['name']}"
        assert record["artifacts"], record["name"]
        for artifact in record["artifacts"]:
            assert set(artifact) >= {"title", "image_id", "layer", "array"}
        assert record["name"] in html
    assert technique(data, "filters")["params"]["count"] == 4
    assert technique(data, "activations")["params"]["max_channels"] == 8


def test_save_arrays_hold_the_numbers_behind_each_picture(full_run, model_file, pictures):
    _, outdir, data = full_run
    arrays = np.load(outdir / "arrays.npz", allow_pickle=False)
    keys = [a["array"] for t in data["techniques"] for a in t["artifacts"]]
    assert all(keys) and len(set(keys)) == len(keys)
    assert sorted(arrays.files) == sorted(keys)

    # activations: H×W×C float32, equal to the layer's output on the preprocessed image
    model = keras.models.load_model(model_file, compile=False)
    activations = technique(data, "activations")["artifacts"]
    assert {(a["image_id"], a["layer"]) for a in activations} == {
        (i, layer) for i in ("a", "b") for layer in ("conv1", "pool1", "conv2")
    }
    for artifact in activations:
        name = "a.png" if artifact["image_id"] == "a" else "b.jpg"
        image = image_io.load(pictures / name, artifact["image_id"], 3, (32, 32))
        batch = image.array[None] / 255.0
        layer = model.get_layer(artifact["layer"])
        expected = np.asarray(keras.Model(model.inputs[0], layer.output)(batch, training=False))[0]
        actual = arrays[artifact["array"]]
        assert actual.dtype == np.float32
        assert actual.ndim == 3 and actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    # Grad-CAM: one heatmap per image in [0, 1], max 1, at conv2's 16×16
    gradcam = technique(data, "gradcam")["artifacts"]
    assert sorted(a["image_id"] for a in gradcam) == ["a", "b"]
    for artifact in gradcam:
        assert artifact["layer"] == "conv2"
        heatmap = arrays[artifact["array"]]
        assert heatmap.shape == (16, 16)
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        assert heatmap.max() == pytest.approx(1.0)

    # filter patterns: uint8 pictures, count × size × size × channels
    filters = technique(data, "filters")["artifacts"]
    assert filters
    for artifact in filters:
        patterns = arrays[artifact["array"]]
        assert patterns.dtype == np.uint8
        assert patterns.shape == (4, 32, 32, 3)


def test_without_save_arrays_array_is_null_and_no_npz(tmp_path, model_file, pictures):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "gradcam", "-t", "activations",
                    "-s", "activations.max_channels=8")
    assert result.exit_code == 0, result.output
    assert not (outdir / "arrays.npz").exists()
    data = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    assert [t["name"] for t in data["techniques"]] == ["gradcam", "activations"]
    artifacts = [a for t in data["techniques"] for a in t["artifacts"]]
    assert artifacts
    assert all(a["array"] is None for a in artifacts)


def test_predictions_sorted_by_score_and_sum_to_one(full_run):
    _, _, data = full_run
    for image in data["images"]:
        predictions = image["predictions"]
        assert len(predictions) == 4  # all classes of the 4-class tiny model
        assert sorted(p["index"] for p in predictions) == [0, 1, 2, 3]
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)
        assert all(set(p) == {"index", "label", "score"} for p in predictions)
        assert all(p["label"] is None for p in predictions)  # no --labels given


# -- vizkit run: exit codes and messages -------------------------------------


def test_undecodable_input_exit_1_and_the_rest_still_reported(tmp_path, model_file, pictures):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures / "a.png", broken, "-o", outdir, *CHEAP)
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.stderr
    data = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    by_id = {image["id"]: image for image in data["images"]}
    assert by_id["broken"]["status"] == "error"
    assert by_id["broken"]["error"] and "decode" in by_id["broken"]["error"]
    assert by_id["broken"]["predictions"] == []
    assert by_id["a"]["status"] == "ok" and by_id["a"]["predictions"]
    assert {t["name"]: t["status"] for t in data["techniques"]} == dict.fromkeys(BUILTINS, "ok")
    assert {a["image_id"] for a in technique(data, "gradcam")["artifacts"]} == {"a"}
    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert by_id["broken"]["error"] in html


def test_unknown_technique_exit_2_lists_installed(tmp_path, model_file, pictures):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-t", "nope")
    assert result.exit_code == 2
    assert "nope" in result.stderr
    for name in BUILTINS:
        assert name in result.stderr
    assert not outdir.exists()


def test_unknown_option_exit_2_names_valid_options(tmp_path, model_file, pictures):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-s", "gradcam.nope=1")
    assert result.exit_code == 2
    assert "nope" in result.stderr
    for option in ("layer", "class", "top", "alpha", "batch"):
        assert option in result.stderr
    assert not outdir.exists()


def test_bad_option_value_exit_2(tmp_path, model_file, pictures):
    outdir = tmp_path / "out"
    result = invoke("run", model_file, pictures, "-o", outdir, "-s", "filters.count=abc")
    assert result.exit_code == 2
    assert "filters.count" in result.stderr and "abc" in result.stderr
    assert not outdir.exists()


def test_unknown_layer_is_a_usage_error_before_any_work(tmp_path, model_file, pictures):
    outdir = tmp_path / "out"
    result = invoke(
        "run", model_file, pictures, "-o", outdir, "-t", "activations", "-t", "gradcam",
        "-s", "activations.layers=conv_2",
    )
    assert result.exit_code == 2, result.output
    assert "activations.layers" in result.stderr and "conv_2" in result.stderr
    names = [name.strip() for name in result.stderr.split("valid layers:", 1)[1].split(",")]
    assert names[0] == "conv2"
    assert {"conv1", "pool1", "conv2"} <= set(names)
    assert not outdir.exists()


def test_missing_model_exit_2_and_no_outdir(tmp_path, pictures):
    outdir = tmp_path / "out"
    result = invoke("run", tmp_path / "missing.keras", pictures, "-o", outdir)
    assert result.exit_code == 2
    assert "missing.keras" in result.stderr
    assert not outdir.exists()


# -- plugins, techniques, layers ---------------------------------------------


def test_plugins_json_lists_builtins():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    builtins = {row["name"]: row for row in rows if row["origin"] == "built-in"}
    assert {f"vizkit.plugins.{name}" for name in BUILTINS} <= set(builtins)
    assert sum(bool(row["model_loaders"]) for row in builtins.values()) >= 1  # the built-in loaders are plugins too
    for name in BUILTINS:
        row = builtins[f"vizkit.plugins.{name}"]
        assert row["techniques"] == [name]
        assert row["version"]
        assert "register_techniques" in row["hooks"]


def test_techniques_lists_all_and_filters_options():
    result = invoke("techniques")
    assert result.exit_code == 0, result.output
    for name in BUILTINS:
        assert re.search(rf"^{name} \(vizkit\.plugins\.{name}\):", result.stdout, re.MULTILINE)
    result = invoke("techniques", "filters")
    assert result.exit_code == 0, result.output
    for option in ("count", "size", "steps", "step", "seed"):
        assert re.search(rf"-s filters\.{option}=<", result.stdout), option
    assert "gradcam" not in result.stdout
    result = invoke("techniques", "nope")
    assert result.exit_code == 2


def test_layers_lists_conv_layers_with_shapes_and_uses(model_file):
    result = invoke("layers", model_file)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "32×32×8" in lines["conv1"] and "16×16×16" in lines["conv2"]
    for name in ("conv1", "conv2"):
        assert {"activations", "filters", "gradcam"} <= set(lines[name].split())
    assert "filters" not in lines["pool1"].split()
    assert not {"activations", "filters", "gradcam"} & set(lines["predictions"].split())

    result = invoke("layers", model_file, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert rows["conv1"]["shape"] == [32, 32, 8]
    assert rows["conv2"]["shape"] == [16, 16, 16]
    assert (rows["conv2"]["kind"], rows["conv2"]["shape"]) == ("Conv2D", [16, 16, 16])
    assert {"activations", "filters", "gradcam"} <= set(rows["conv2"]["techniques"])
    assert {"activations", "gradcam"} <= set(rows["pool1"]["techniques"]) and "filters" not in rows["pool1"]["techniques"]
    for row in rows.values():  # the CAM family takes the layers Grad-CAM takes
        assert ("gradcam" in row["techniques"]) == ({"gradcampp", "layercam", "scorecam"} <= set(row["techniques"]))
    assert rows["predictions"]["techniques"] == []


def test_layers_of_nested_model_by_path(tmp_path):
    path = tmp_path / "nested.keras"
    build_nested().save(path)
    result = invoke("layers", path, "--json")
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in json.loads(result.stdout)}
    assert "filters" in rows["base/base_conv1"]["techniques"]
    assert rows["base/base_conv1"]["shape"] == [32, 32, 8]
    assert rows["base"]["techniques"] == []
    text = invoke("layers", path).stdout
    assert re.search(r"^base/base_conv1\s", text, re.MULTILINE)


def test_layers_of_missing_model_exit_2(tmp_path):
    result = invoke("layers", tmp_path / "missing.keras")
    assert result.exit_code == 2
    assert "missing.keras" in result.stderr


# -- vizkit demo ---------------------------------------------------------------


def test_demo_labels_the_sample_photos_and_gradcam_sits_on_the_cat(tmp_path, monkeypatch):
    from vizkit import demo

    # The demo's techniques and layers, with less work where its time goes.
    monkeypatch.setitem(demo.SETTINGS, "filters", {**demo.SETTINGS["filters"], "count": 2, "steps": 2})
    monkeypatch.setitem(demo.SETTINGS, "occlusion", {"patch": 112, "stride": 112})
    monkeypatch.setitem(demo.METRICS, "faithfulness", {"steps": 4})
    monkeypatch.setitem(demo.METRICS, "randomization", {"images": 1, "steps": 1})
    outdir = tmp_path / "demo"
    result = invoke("demo", "-o", outdir, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    top5 = {image["id"]: [p["label"] for p in image["predictions"]] for image in data["images"]}
    assert top5["chelsea"][0] == "Egyptian cat"
    assert top5["coffee"][0] == "espresso"
    assert {"missile", "projectile", "space shuttle"} & set(top5["rocket"][:3])
    assert {t["name"]: t["status"] for t in data["techniques"]} == dict.fromkeys(demo.SETTINGS, "ok")
    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert html.count('class="comparison-row"') == 3
    # the evidence: every comparable technique measured by both metrics, in the summary table
    assert [m["name"] for m in data["metrics"]] == list(demo.METRICS) and not any(m["errors"] for m in data["metrics"])
    comparable = {t["name"] for t in data["techniques"] if t["comparable"]}
    assert {row["technique"] for row in data["summary"]} == comparable
    assert all(set(row["values"]) == set(demo.METRICS) for row in data["summary"])
    assert '<section id="evidence">' in html and html.count('<tr class="flagged">') == sum(bool(r["warnings"]) for r in data["summary"])


def test_run_efficientnet_lite0_gradcam_on_the_cat(tmp_path):
    """The named model works from the CLI; the heat sits on the cat's face, not the border."""
    from vizkit.samples import sample_photos

    outdir = tmp_path / "out"
    chelsea = sample_photos()[0]
    result = invoke("run", "efficientnet-lite0", chelsea, "-t", "gradcam", "-o", outdir, "--save-arrays", "--no-metrics")
    assert result.exit_code == 0, result.output
    data = json.loads((outdir / "report.json").read_text(encoding="utf-8"))
    top = data["images"][0]["predictions"][0]
    assert (top["index"], top["label"]) == (285, "Egyptian cat")
    (artifact,) = data["techniques"][0]["artifacts"]
    heatmap = np.load(outdir / "arrays.npz")[artifact["array"]]
    assert heatmap.shape == (7, 7)
    # Chelsea's head fills the middle of the photo; the corners are background.
    rows, cols = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 1 <= rows <= 5 and 1 <= cols <= 5
    assert heatmap[2:5, 2:5].mean() > 2 * np.mean([heatmap[0, 0], heatmap[0, -1], heatmap[-1, 0], heatmap[-1, -1]])
