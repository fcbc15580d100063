"""A test kit for plugin authors: pytest fixtures, loaded automatically once vizkit is installed.

    def test_my_technique(vizkit_plugin, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
        vizkit_plugin(my_plugin_module)
        result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "mine", "-o", tmp_path / "out")
        assert result.exit_code == 0, result.output

Fixtures: ``vizkit_model`` (a tiny Keras classifier), ``vizkit_model_file`` (it, saved as
.keras), ``vizkit_images`` (a folder with vizkit's three sample photos),
``vizkit_context`` (a ready :class:`vizkit.RunContext` for calling a technique directly),
``vizkit_cli`` (runs the ``vizkit`` command in-process, with the plugins of
``vizkit_plugin``), ``vizkit_plugin`` (adds a plugin object to this test's runs) and
``vizkit_host`` (the plugin host such a run uses). This module imports nothing heavy
until a fixture is used, since pytest loads it in every session.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_classifier(size: int = 32, classes: int = 4, name: str = "tiny"):
    """conv1 → pool1 → conv2 → global average pool → softmax; seeded, untrained."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", padding="same", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


@pytest.fixture
def vizkit_model():
    return tiny_classifier()


@pytest.fixture
def vizkit_model_file(tmp_path, vizkit_model) -> Path:
    path = tmp_path / "tiny.keras"
    vizkit_model.save(path)
    return path


@pytest.fixture
def vizkit_images(tmp_path) -> Path:
    import shutil

    from vizkit.samples import sample_photos

    folder = tmp_path / "images"
    folder.mkdir()
    for photo in sample_photos():
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture
def vizkit_context(vizkit_model, vizkit_images):
    """``make(technique=None, params=None, preprocess=unit, labels=None)`` → a RunContext.

    As in a real run: the tiny model, the images with their predictions, and, given a
    technique, ``params`` validated and completed with its defaults.
    """
    from vizkit import ModelGraph, RunContext
    from vizkit import images as image_io
    from vizkit.preprocess import unit
    from vizkit.chunk import add_predictions

    graph = ModelGraph.of(vizkit_model)
    files, _ = image_io.collect([vizkit_images])
    loaded = image_io.load_all(files, graph.channels, graph.fixed_size)

    def make(technique=None, params: dict | None = None, preprocess=unit, labels=None) -> RunContext:
        params = dict(params or {})
        if technique is not None:
            params = technique.resolve_params(params)
        add_predictions(graph, loaded, preprocess, labels)
        return RunContext(graph, loaded, params, preprocess, labels)

    return make


@pytest.fixture
def vizkit_plugin():
    """``register(plugin, name=None)``: the plugin takes part in this test's vizkit runs
    (``vizkit_cli``, ``vizkit_host``); nothing global changes."""
    added: list[tuple[str, object]] = []

    def register(plugin, name: str | None = None) -> None:
        added.append((name or getattr(plugin, "__name__", type(plugin).__name__), plugin))

    register.plugins = added
    return register


@pytest.fixture
def vizkit_cli(vizkit_plugin):
    """``invoke(*args, env=None)`` → click's Result of ``vizkit *args``, run in-process."""
    from click.testing import CliRunner

    from vizkit.cli import main

    def invoke(*args, env: dict | None = None):
        return CliRunner().invoke(
            main, [str(arg) for arg in args], env=env, catch_exceptions=False, obj={"plugins": vizkit_plugin.plugins}
        )

    return invoke


@pytest.fixture
def vizkit_host(vizkit_plugin):
    """``make(plugins=(), disabled=())`` → the plugin host a run of this test would use."""
    from vizkit import host

    def make(plugins=(), disabled=()):
        return host.plugin_manager(plugins, disabled, extra=vizkit_plugin.plugins)

    return make
