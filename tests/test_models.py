"""vizkit.models.load_model and ModelGraph's input checks, on real (tiny) Keras models."""

from __future__ import annotations

import hashlib
import shutil
import textwrap

import keras
import numpy as np
import pytest

from vizkit.graph import ModelGraph
from vizkit.models import ModelLoadError, load_model

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

    for alias in ("MobileNetV2", "mobilenet-v2"):
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
