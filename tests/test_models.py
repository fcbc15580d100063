"""vizkit.models.load_model, the built-in model loader plugins, and ModelGraph's input
checks, on real (tiny) Keras models."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from vizkit import host
from vizkit.cli import main
from vizkit.extension import ModelLoader
from vizkit.graph import ModelGraph
from vizkit.models import LoadedModel, ModelLoadError, builtin_loaders, load_model
from vizkit.testing import tiny_classifier

from conftest import build_nested


def _batch(size: int = 32, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


def _predict(model, batch: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(batch, training=False))


def _write_factory_module(tmp_path, monkeypatch, module: str, source: str) -> None:
    """An importable module ``module`` in tmp_path (each test uses its own module name)."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


# -- .keras files ------------------------------------------------------------


def test_keras_file_round_trip_predictions_and_sha256(tiny_model, tiny_model_file):
    loaded = load_model(str(tiny_model_file))

    batch = _batch()
    expected = _predict(tiny_model, batch)
    got = _predict(loaded.model, batch)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # not a trivially constant model: the check above would pass for any copy otherwise
    assert not np.allclose(expected[0], expected[1])

    assert loaded.sha256 == hashlib.sha256(tiny_model_file.read_bytes()).hexdigest()
    assert loaded.source == str(tiny_model_file)
    assert loaded.name == "tiny"
    # tiny starts with a Conv2D: the usual 1/255 training is assumed
    assert loaded.preprocess == "unit"


def test_keras_file_starting_with_rescaling_defaults_to_no_preprocessing(tmp_path):
    path = tmp_path / "outer.keras"
    build_nested().save(path)

    loaded = load_model(str(path))

    assert loaded.preprocess == "none"
    assert "Rescaling" in loaded.preprocess_reason


def test_sequential_starting_with_rescaling_defaults_to_no_preprocessing(tmp_path):
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    path = tmp_path / "seq.keras"
    model.save(path)

    assert load_model(str(path)).preprocess == "none"


def test_augmentation_then_rescaling_defaults_to_no_preprocessing(tmp_path):
    """The chapter's cats-vs-dogs shape: inputs → data_augmentation → Rescaling(1/255) → convs.

    The model rescales inside (augmentation is a no-op at inference), so dividing the
    pixels by 255 first would scale them twice.
    """
    keras.utils.set_random_seed(6)
    augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)],
        name="data_augmentation",
    )
    inputs = keras.Input((32, 32, 3))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    path = tmp_path / "augmented.keras"
    keras.Model(inputs, outputs).save(path)

    assert load_model(str(path)).preprocess == "none"


def test_missing_keras_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "model.keras"
    with pytest.raises(ModelLoadError) as info:
        load_model(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message


def test_corrupt_h5_file_is_a_model_load_error(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "cannot load model file" in message


def test_uppercase_h5_suffix_is_refused_with_the_rename(tmp_path, tiny_model):
    """Keras reads only lowercase suffixes; vizkit says so instead of Keras's confusing error."""
    lower = tmp_path / "model.h5"
    tiny_model.save(lower)
    upper = tmp_path / "MODEL.H5"
    shutil.copy(lower, upper)

    with pytest.raises(ModelLoadError, match=r"rename MODEL\.H5 to MODEL\.h5"):
        load_model(str(upper))


# -- legacy Keras 2 .h5 files ------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*HDF5 file.*:UserWarning", "ignore:Do not pass an `input_shape`:UserWarning")
def test_legacy_tf_keras_h5_matches_tf_keras_predictions(tmp_path):
    tf_keras = pytest.importorskip("tf_keras")
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(3)
    legacy = tf_keras.Sequential(
        [
            layers.Conv2D(8, 3, activation="relu", input_shape=(32, 32, 3), name="conv1"),
            layers.MaxPooling2D(2, name="pool1"),
            layers.Conv2D(16, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(16, activation="relu", name="dense1"),
            layers.Dense(1, activation="sigmoid", name="output"),
        ],
        name="cats_vs_dogs",
    )
    legacy.compile(optimizer="rmsprop", loss="binary_crossentropy")
    path = tmp_path / "x.h5"
    legacy.save(str(path))  # full model, legacy HDF5 format

    batch = _batch(n=4, seed=7)
    expected = legacy.predict(batch, verbose=0)
    assert expected.shape == (4, 1)
    assert np.ptp(expected) > 1e-4  # the inputs give different outputs

    loaded = load_model(str(path))
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_allclose(_predict(loaded.model, batch), expected, rtol=0, atol=1e-5)

    graph = ModelGraph(loaded.model)
    assert [info.path for info in graph.layers if info.conv] == ["conv1", "conv2"]
    assert graph.info("conv1").shape == (30, 30, 8)
    assert graph.fixed_size == (32, 32)
    np.testing.assert_allclose(graph.predict(batch), expected, rtol=0, atol=1e-5)


# -- factories ---------------------------------------------------------------

UNBUILT_SEQUENTIAL = """
    import keras

    def make():
        keras.utils.set_random_seed(4)
        return keras.Sequential(
            [
                keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                keras.layers.Flatten(name="flatten"),
                keras.layers.Dense(3, activation="softmax", name="out"),
            ],
            name="unbuilt",
        )
"""


def test_never_built_sequential_factory_is_built_with_size(tmp_path, monkeypatch):
    _write_factory_module(tmp_path, monkeypatch, "vizkit_factory_unbuilt_a", UNBUILT_SEQUENTIAL)

    loaded = load_model("vizkit_factory_unbuilt_a:make", size=32)

    assert loaded.model.built
    assert loaded.source == "vizkit_factory_unbuilt_a:make"
    assert loaded.sha256 is None
    graph = ModelGraph(loaded.model)
    assert graph.fixed_size == (32, 32)
    assert graph.channels == 3
    assert graph.info("conv").shape == (30, 30, 4)
    assert graph.info("conv").conv
    assert graph.output_shape == (3,)
    batch = _batch()
    scores = graph.predict(batch)
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores, _predict(loaded.model, batch), atol=1e-6)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_never_built_sequential_factory_without_size_asks_for_size(tmp_path, monkeypatch):
    _write_factory_module(tmp_path, monkeypatch, "vizkit_factory_unbuilt_b", UNBUILT_SEQUENTIAL)

    with pytest.raises(ModelLoadError) as info:
        load_model("vizkit_factory_unbuilt_b:make")
    assert "--size" in str(info.value)


def test_factory_returning_a_non_model_names_the_type(tmp_path, monkeypatch):
    _write_factory_module(
        tmp_path,
        monkeypatch,
        "vizkit_factory_not_a_model",
        """
        def make():
            return {"layers": ["conv"]}
        """,
    )

    with pytest.raises(ModelLoadError) as info:
        load_model("vizkit_factory_not_a_model:make")
    message = str(info.value)
    assert "dict" in message
    assert "vizkit_factory_not_a_model:make" in message


def test_factory_that_cannot_be_imported_is_a_model_load_error(tmp_path, monkeypatch):
    _write_factory_module(tmp_path, monkeypatch, "vizkit_factory_present", "def make():\n    pass\n")

    with pytest.raises(ModelLoadError, match="no_such_function"):
        load_model("vizkit_factory_present:no_such_function")
    with pytest.raises(ModelLoadError, match="vizkit_no_such_module"):
        load_model("vizkit_no_such_module:make")


def test_factory_that_raises_is_a_model_load_error_naming_it(tmp_path, monkeypatch):
    """The user's factory failing is their error to fix, not a crash of vizkit."""
    _write_factory_module(
        tmp_path,
        monkeypatch,
        "vizkit_factory_raises",
        """
        def make():
            raise RuntimeError("the weights server is down")
        """,
    )

    with pytest.raises(ModelLoadError) as info:
        load_model("vizkit_factory_raises:make")
    message = str(info.value)
    assert "model factory vizkit_factory_raises:make raised RuntimeError: the weights server is down" in message
    assert "(vizkit_factory_raises.py:3)" in message  # where in the user's file
    assert isinstance(info.value.__cause__, RuntimeError)

    result = CliRunner().invoke(main, ["layers", "vizkit_factory_raises:make"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "the weights server is down" in result.output
    assert "Traceback" not in result.output


def test_factory_module_that_raises_on_import_is_a_model_load_error(tmp_path, monkeypatch):
    _write_factory_module(
        tmp_path, monkeypatch, "vizkit_factory_import_raises", "raise OSError('no GPU here')\n\ndef make():\n    pass\n"
    )

    with pytest.raises(ModelLoadError, match=r"cannot import model factory vizkit_factory_import_raises:make: OSError: no GPU here"):
        load_model("vizkit_factory_import_raises:make")


def test_factory_of_a_missing_module_mentions_a_missing_scheme_plugin():
    with pytest.raises(ModelLoadError) as info:
        load_model("vizkitzoo:resnet")
    message = str(info.value)
    assert "No module named 'vizkitzoo'" in message
    assert "vizkitzoo: is meant as a model scheme" in message


# -- names -------------------------------------------------------------------


def test_unknown_name_suggests_the_closest_application_first():
    with pytest.raises(ModelLoadError) as info:
        load_model("vgg61")
    message = str(info.value)
    assert "'vgg61'" in message
    suggestions = message.split("one of: ", 1)[1].split(", ")
    assert suggestions[0] == "vgg16", message


def test_application_by_name_with_random_weights():
    loaded = load_model("mobilenet_v2", weights="none")

    assert isinstance(loaded.model, keras.Model)
    assert loaded.name == "mobilenet_v2"
    assert loaded.source == "keras.applications.MobileNetV2"
    assert loaded.preprocess == "tf"
    assert loaded.sha256 is None
    assert tuple(loaded.model.input_shape) == (None, 224, 224, 3)
    assert tuple(loaded.model.output_shape) == (None, 1000)

    for alias in ("MobileNetV2", "mobilenet-v2", "keras-application:mobilenet_v2"):
        other = load_model(alias, weights="none")
        assert (other.name, other.source, other.preprocess) == (
            loaded.name,
            loaded.source,
            loaded.preprocess,
        )
        assert tuple(other.model.input_shape) == (None, 224, 224, 3)


def test_application_rejects_unknown_weights():
    with pytest.raises(ModelLoadError, match="--weights"):
        load_model("mobilenet_v2", weights="cifar")


# -- the loaders are plugins -------------------------------------------------

CLAIMING_PLUGIN = """
import vizkit
from vizkit.extension import ModelLoader
from vizkit.testing import tiny_classifier

CLAIMED = []


def claims(spec):
    return spec.endswith(".keras") or spec == "vgg16"


def load(spec):  # the old one-argument signature
    CLAIMED.append(spec)
    return tiny_classifier(name="claimed")


@vizkit.hookimpl
def register_model_loaders(register):
    register(ModelLoader("claim", load, "claims .keras files and vgg16", match=claims))
"""

BUILTIN_LOADERS = {
    "vizkit.plugins.keras_models": ["keras-application", "keras-factory", "keras-file"],
    "vizkit.plugins.efficientnet_lite": ["efficientnet-lite"],
}


def test_builtin_loaders_come_from_the_builtin_plugins_in_call_order():
    pm = host.plugin_manager()
    loaders = host.model_loaders(pm)
    assert set(loaders) == {scheme for schemes in BUILTIN_LOADERS.values() for scheme in schemes}
    assert list(loaders)[-1] == "keras-factory"  # trylast, and last of its plugin: the a:b catch-all
    assert list(loaders) == list(builtin_loaders())  # load_model's default
    assert all(isinstance(loader, ModelLoader) and loader.description for loader in loaders.values())
    assert "vgg16" in loaders["keras-application"].names
    assert loaders["efficientnet-lite"].names == ("efficientnet-lite0",)
    assert loaders["keras-file"].match("a/b/model.h5") and not loaders["keras-file"].match("vgg16")
    assert loaders["keras-factory"].match("pkg.mod:make") and not loaders["keras-factory"].match("hub:org/model")


def test_vizkit_plugins_json_lists_the_builtin_loader_plugins():
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output[result.output.index("["):])}
    for name, schemes in BUILTIN_LOADERS.items():
        row = rows[name]
        assert (row["origin"], row["status"]) == ("built-in", "ok")
        assert row["hooks"] == ["register_model_loaders"]
        assert row["techniques"] == []
        assert row["model_loaders"] == schemes


def test_builtin_loader_plugins_and_models_import_without_tensorflow():
    code = (
        "import sys, vizkit.models, vizkit.plugins.keras_models, vizkit.plugins.efficientnet_lite\n"
        "vizkit.models.builtin_loaders()\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_a_plugin_loader_that_matches_wins_over_the_builtin(tmp_path, tiny_model_file, monkeypatch):
    plugin = tmp_path / "claiming.py"
    plugin.write_text(CLAIMING_PLUGIN, encoding="utf-8")
    pm = host.plugin_manager([str(plugin)])
    loaders = host.model_loaders(pm)

    loaded = load_model(str(tiny_model_file), loaders=loaders)
    assert loaded.name == "claimed"  # not "tiny", the model in the file
    assert loaded.source == str(tiny_model_file)  # a bare keras.Model: the whole spec is the source
    assert loaded.sha256 is None
    assert load_model("vgg16", loaders=loaders).name == "claimed"  # no download, no VGG16
    module = next(plugin for plugin in pm.get_plugins() if hasattr(plugin, "CLAIMED"))
    assert module.CLAIMED == [str(tiny_model_file), "vgg16"]  # it got the whole specs

    # What it does not claim still goes to the built-ins; its scheme prefix reaches it too.
    _write_factory_module(tmp_path, monkeypatch, "vizkit_factory_unclaimed", UNBUILT_SEQUENTIAL)
    assert load_model("vizkit_factory_unclaimed:make", size=32, loaders=loaders).name == "unbuilt"
    assert load_model("claim:anything", loaders=loaders).name == "claimed"
    assert module.CLAIMED[-1] == "anything"
    # and a built-in scheme prefix bypasses the plugin's match
    direct = load_model(f"keras-file:{tiny_model_file}", loaders=loaders)
    assert direct.name == "tiny"
    assert direct.sha256 == hashlib.sha256(tiny_model_file.read_bytes()).hexdigest()

    # Without the plugin the file is the file.
    assert load_model(str(tiny_model_file), loaders=host.model_loaders(host.plugin_manager())).name == "tiny"


def test_loaders_get_weights_and_size_only_when_they_declare_them():
    calls = []

    def plain(rest):
        calls.append(("plain", rest))
        return tiny_classifier(name="plain")

    def sized(rest, size):
        calls.append(("sized", rest, size))
        return tiny_classifier(size=size, name="sized")

    def keywords(spec, *, weights, size=None):
        calls.append(("keywords", spec, weights, size))
        return tiny_classifier(name="keywords")

    loaders = {
        "plain": ModelLoader("plain", plain),
        "sized": ModelLoader("sized", sized),
        "kw": ModelLoader("kw", keywords, match=lambda spec: spec.startswith("kw/")),
    }
    assert load_model("plain:a", weights="none", size=48, loaders=loaders).name == "plain"
    sized_model = load_model("sized:b", weights="none", size=48, loaders=loaders)
    assert ModelGraph(sized_model.model).fixed_size == (48, 48)
    load_model("kw/c", weights="none", loaders=loaders)
    assert calls == [("plain", "a"), ("sized", "b", 48), ("keywords", "kw/c", "none", None)]


def test_loader_results_and_failures_are_checked():
    def broken_match(spec):
        raise KeyError(spec)

    loaders = {
        "number": ModelLoader("number", lambda rest: 42),
        "hollow": ModelLoader("hollow", lambda rest: LoadedModel("not a model", "x", rest, None, "unit", "")),
        "given": ModelLoader("given", lambda rest: LoadedModel(tiny_classifier(name="g"), "given-name", "zoo", None, "caffe", "the zoo says", ["a", "b", "c", "d"])),
        "picky": ModelLoader("picky", lambda rest: 1, match=broken_match),
    }
    with pytest.raises(ModelLoadError, match="the number: model loader returned int, not a keras.Model"):
        load_model("number:x", loaders=loaders)
    with pytest.raises(ModelLoadError, match="LoadedModel holding str"):
        load_model("hollow:x", loaders=loaders)
    given = load_model("given:x", loaders=loaders)
    assert (given.name, given.source, given.preprocess, given.labels) == ("given-name", "zoo", "caffe", ["a", "b", "c", "d"])
    with pytest.raises(ModelLoadError, match="the picky: model loader failed to check 'whatever'"):
        load_model("whatever", loaders=loaders)


def test_unknown_spec_lists_the_loaders_and_the_closest_scheme():
    loaders = {"zoo": ModelLoader("zoo", lambda rest: None, "models from the zoo"), **builtin_loaders()}
    with pytest.raises(ModelLoadError) as info:
        load_model("zo:org/model", loaders=loaders)
    message = str(info.value)
    assert "no model loader has the scheme 'zo'" in message
    assert message.split("(schemes: ", 1)[1].startswith("zoo, ")
    for described in ("models from the zoo (zoo:)", "model file", "(keras-file:)", "package.module:function"):
        assert described in message
    assert "efficientnet-lite0" in message.split("one of: ", 1)[1]

    with pytest.raises(ModelLoadError, match="no model loaders are registered"):
        load_model("vgg16", loaders={})


# -- ModelGraph input checks -------------------------------------------------


def test_model_graph_rejects_two_inputs():
    left = keras.Input((8, 8, 3), name="left")
    right = keras.Input((8, 8, 3), name="right")
    merged = keras.layers.Add()([left, right])
    outputs = keras.layers.Conv2D(2, 3)(merged)
    model = keras.Model([left, right], outputs, name="two_inputs")

    with pytest.raises(ValueError) as info:
        ModelGraph(model)
    message = str(info.value)
    assert "two_inputs" in message
    assert "2 inputs" in message
    assert "one image input" in message


def test_model_graph_rejects_a_vector_input():
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(4), keras.layers.Dense(2)], name="vector"
    )

    with pytest.raises(ValueError) as info:
        ModelGraph(model)
    message = str(info.value)
    assert "vector" in message
    assert "(10,)" in message
    assert "channels" in message
