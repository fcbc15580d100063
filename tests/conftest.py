"""Shared fixtures: real tiny Keras models and real image files (no mocks of TensorFlow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # the kernels a run uses (vizkit.tensorflow_setup)

import keras
import numpy as np
import pytest
from PIL import Image

import vizkit
from vizkit.testing import tiny_classifier


build_tiny = tiny_classifier


def raise_a_class(model, report: Path) -> int:
    """Raise by 20 the bias of the class that is top-1 for the fewest images of ``report``
    (a report folder of ``model``), so that every image's top-1 becomes that class; returns
    how many images flip. The model changes in place; the caller saves it."""
    tops = [image["predictions"][0]["index"] for image in json.loads((report / "report.json").read_text())["images"]]
    kernel, bias = model.get_layer("predictions").get_weights()
    raised = min(range(len(bias)), key=lambda c: (tops.count(c), c))
    bias[raised] += 20.0
    model.get_layer("predictions").set_weights([kernel, bias])
    return sum(top != raised for top in tops)


def build_nested(size: int = 32, classes: int = 3) -> keras.Model:
    """The transfer-learning shape: a whole base model used as one layer of an outer model."""
    keras.utils.set_random_seed(2)
    base_in = keras.Input((size, size, 3))
    y = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="base_conv1")(base_in)
    y = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="base_conv2")(y)
    base = keras.Model(base_in, y, name="base")
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="outer")


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    """Converted models go to a folder of this test session, never the user's cache, and
    plugins installed in the environment (the example package, say) stay out of the
    runs: tests of entry points turn them back on with monkeypatch.delenv."""
    settings = {
        "VIZKIT_CACHE_DIR": str(tmp_path_factory.mktemp("vizkit-cache")),
        "VIZKIT_LOAD_PLUGINS": "",
    }
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """A folder shared by one test module's tests (named after the module)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def model_file(workdir):
    """The tiny model saved once per test module."""
    path = workdir / "tiny.keras"
    build_tiny().save(path)
    return path


@pytest.fixture
def tiny_model() -> keras.Model:
    return build_tiny()


@pytest.fixture
def nested_model() -> keras.Model:
    return build_nested()


@pytest.fixture
def tiny_model_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.keras"
    tiny_model.save(path)
    return path


def write_image(path, size=(40, 48), mode="RGB", seed=0, **save_args):
    """A real image file with random (seeded) content; ``size`` is (width, height)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, **save_args)
    return path


def write_sample_folder(folder):
    """``folder`` with two decodable images, a.png and b.jpg."""
    folder.mkdir()
    write_image(folder / "a.png", seed=1)
    write_image(folder / "b.jpg", seed=2)
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return write_sample_folder(tmp_path / "images")


class PickyTechnique:
    """A plugin whose ``picky`` technique fails on any batch holding image ``image_id``
    (and, with ``boom``, a ``boom`` technique that fails before any image)."""

    def __init__(self, image_id: str, boom: bool = False):
        self.image_id, self.boom = image_id, boom

    def picky(self, context, batch):
        from vizkit import Artifact

        if any(image.id == self.image_id for image in batch.images):
            raise ValueError(f"{self.image_id} is not welcome")
        return [Artifact(image.id, image.array[..., 0], image.display, image_id=image.id) for image in batch.images]

    @staticmethod
    def explode(context):
        raise RuntimeError("the plugin broke")

    @vizkit.hookimpl
    def register_techniques(self, register):
        from vizkit import Technique

        if self.boom:
            register(Technique("boom", run=self.explode, description="always fails"))
        register(Technique("picky", run_batch=self.picky, description=f"fails on {self.image_id}"))
