"""Issue 13, bounds: options that size allocations are bounded by memory (a usage error,
exit 2, before any work), and the filters' long compiled loop stops on Ctrl-C.

Real tiny Keras models; the memory budget is patched where a test needs a bound the tiny
model reaches, so the results do not depend on the machine's memory.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import build_tiny
from vizkit import ModelGraph, OptionError, RunContext, featureviz, kit
from vizkit.plugins import attributions, faithfulness, filters, perturbation, perturbation_cams
from vizkit.plugins.filters import filter_patterns, memory_needed

MiB = 1 << 20


def context_for(technique, model, **params) -> RunContext:
    """A RunContext as a run makes it for the option checks: the model, no images yet."""
    return RunContext(ModelGraph.of(model), [], technique.resolve_params(params))


def at_most(error: Exception) -> int:
    match = re.search(r"use at most (\d+)", str(error))
    assert match, str(error)
    return int(match.group(1))


def wide_model(channels: int = 64) -> keras.Model:
    """One conv layer wider than the filters' default batch of 16."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="wide")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


# -- the helpers ------------------------------------------------------------------------


def test_check_memory_names_the_largest_value_that_fits(monkeypatch):
    monkeypatch.setattr(kit, "memory_budget", lambda: 1000)
    kit.check_memory(100, lambda n: n * 10)  # exactly the budget: fine
    with pytest.raises(ValueError) as error:
        kit.check_memory(10**30, lambda n: n * 10, "for the copies", "a smaller batch")
    message = str(error.value)
    assert "needs about" in message and "for the copies" in message and "vizkit plans with" in message
    assert at_most(error.value) == 100 and message.endswith("use at most 100, or a smaller batch")
    with pytest.raises(ValueError, match=r"even 8 needs .*; use a coarser grid$"):
        kit.check_memory(20, lambda n: 1000 + n, fix="a coarser grid", low=8)


def test_memory_budget_is_three_quarters_of_the_memory():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < kit.memory_budget() <= total * 3 // 4


def test_activation_bytes_of_the_tiny_model():
    """conv1 32×32×8, pool1 16×16×8, conv2 16×16×16, then 16 + 4 values: per input pixel
    the input 3, the layers 8, 2 and 4 floats."""
    graph = ModelGraph.of(build_tiny())
    assert kit.image_bytes(graph) == 4 * 32 * 32 * 3
    assert kit.activation_bytes(graph) == 4 * ((3 + 8 + 4 + 2) * 1024 + 20)  # the 3 largest
    assert kit.activation_bytes(graph, gradients=True) == 4 * ((3 + 14 + 8) * 1024 + 20)  # all + the largest again
    assert kit.activation_bytes(graph, side=150, upto="conv1", gradients=True) == 4 * (3 + 8 + 8) * 150 * 150
    # the same layers on a model that takes any size: shapes worked out symbolically
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    free = ModelGraph.of(keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x)))
    assert free.fixed_size is None
    assert kit.activation_bytes(free, side=32) == kit.activation_bytes(graph)
    assert kit.image_bytes(free) == 4 * 512 * 512 * 3


# -- filters: the bounds --------------------------------------------------------------


def test_filters_size_100000_is_a_usage_error_at_once(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "filters", "-s", "filters.size=100000", "-o", out)
    assert result.exit_code == 2, result.output
    assert "filters.size: '100000' is above the maximum 4096" in result.output
    assert time.monotonic() - started < 10 and not out.exists()


def test_filters_size_beyond_memory_is_a_usage_error(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path, monkeypatch):
    """4096 is within the maximum, but 16 patterns of 4096² through conv2 are not within
    1 GiB: the check says the largest size that is, before any work."""
    monkeypatch.setattr(kit, "memory_budget", lambda: 1 << 30)
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, "-t", "filters", "-s", "filters.size=4096", "-o", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert re.search(r"filters\.size: 4096 needs about [\d.]+ GiB of memory \(gradient ascent of \d+ filters", line), line
    assert "more than the 1.0 GiB vizkit plans with" in line and "or fewer filters at a time (filters.batch)" in line
    assert not out.exists()
    most = at_most(line)
    graph = ModelGraph.of(build_tiny())
    paths, _ = filters.default_layers(graph)
    assert memory_needed(graph, paths, 64, most, 16)[0] <= 1 << 30 < memory_needed(graph, paths, 64, most + 1, 16)[0]


def test_filters_blames_the_option_that_grew_the_memory(monkeypatch):
    """Only one option's check fails: the one whose value costs the most over its default."""
    model = wide_model(128)
    graph = ModelGraph.of(model)
    budget = memory_needed(graph, ["wide"], 64, 150, 16)[0] * 1.01  # the defaults just fit
    monkeypatch.setattr(kit, "memory_budget", lambda: budget)
    technique = filters.TECHNIQUE
    technique.check_params(context_for(technique, model))
    for option, value, fix in [
        ("batch", 64, "or a smaller filters.size"),
        ("count", 128, "or fewer filters at a time (filters.batch) or a smaller filters.size"),
        ("size", 400, "or fewer filters at a time (filters.batch)"),
    ]:
        with pytest.raises(OptionError, match=rf"^filters\.{option}: {value} needs about .*, {re.escape(fix)}$") as error:
            technique.check_params(context_for(technique, model, **{option: value}))
        most = at_most(error.value)
        assert {"batch": 16, "count": 64, "size": 150}[option] <= most < value  # the defaults fit
        technique.check_params(context_for(technique, model, **{option: most}))
    # size grew more (×4 in area) than the batch (×2): the size is blamed
    with pytest.raises(OptionError, match=r"^filters\.size: 300 needs"):
        technique.check_params(context_for(technique, model, size=300, batch=32))
    # the notebook function checks too, before it allocates anything
    with pytest.raises(ValueError, match="use at most"):
        filter_patterns(model, "wide", filters=64, size=400)


# -- the other bounds -----------------------------------------------------------------


BOUNDED = [
    # technique, option, a value beyond the budget, the other options it takes, the budget in MiB
    (filters.TECHNIQUE, "size", 4096, {}, 64),
    (perturbation.RISE, "masks", 10**7, {"grid": 16}, 64),
    (perturbation.RISE, "grid", 30, {"masks": 2000}, 16),
    (perturbation.RISE, "per_pass", 10**6, {"masks": 5000}, 64),
    (perturbation.OCCLUSION, "per_pass", 10**6, {"patch": 1, "stride": 1}, 64),
    (attributions.SMOOTHGRAD, "samples", 10**6, {}, 64),
    (attributions.SMOOTHGRAD, "per_pass", 10**6, {"samples": 1000, "batch": 64}, 64),
    (attributions.INTEGRATED_GRADIENTS, "steps", 4096, {}, 64),
    (attributions.INTEGRATED_GRADIENTS, "per_pass", 10**6, {"steps": 1000, "batch": 64}, 64),
    (perturbation_cams.SCORECAM, "masks_per_pass", 10**6, {}, 4),
    (perturbation_cams.ABLATIONCAM, "channels_per_pass", 10**6, {}, 4),
    (perturbation_cams.SCORECAM, "batch", 10**6, {}, 64),
]


@pytest.mark.parametrize(
    "technique, option, value, settings, budget", BOUNDED, ids=[f"{b[0].name}.{b[1]}" for b in BOUNDED]
)
def test_each_bound_names_the_largest_value_that_fits(technique, option, value, settings, budget, monkeypatch):
    """The option's check fails naming N; with N it passes, with N + 1 it fails again."""
    monkeypatch.setattr(kit, "memory_budget", lambda: budget * MiB)
    model = build_tiny()
    with pytest.raises(OptionError, match=rf"^{technique.name}\.{option}: {value} needs about") as error:
        technique.check_params(context_for(technique, model, **settings, **{option: value}))
    most = at_most(error.value)
    assert 1 <= most < value
    technique.check_params(context_for(technique, model, **settings, **{option: most}))
    with pytest.raises(OptionError, match=rf"^{technique.name}\.{option}: {most + 1} needs"):
        technique.check_params(context_for(technique, model, **settings, **{option: most + 1}))


def test_faithfulness_per_pass_is_bounded(monkeypatch):
    monkeypatch.setattr(kit, "memory_budget", lambda: 4 * MiB)
    metric, model = faithfulness.METRIC, build_tiny()
    graph = ModelGraph.of(model)
    with pytest.raises(OptionError, match=r"^faithfulness\.per_pass: 64 needs about .* use at most \d+$"):
        metric.check_params(RunContext(graph, [], metric.resolve_params({"per_pass": 64})))
    metric.check_params(RunContext(graph, [], metric.resolve_params({"per_pass": 10})))


@pytest.mark.parametrize("args, option", [
    (["-t", "rise", "-s", "rise.masks=1000000000000"], "rise.masks"),
    (["-t", "smoothgrad", "-s", "smoothgrad.samples=1000000000"], "smoothgrad.samples"),
    (["-t", "gradcam", "-s", "gradcam.batch=1000000000000"], "gradcam.batch"),
    (["-t", "integrated_gradients", "-s", "integrated_gradients.steps=5000"], "integrated_gradients.steps"),
])
def test_absurd_values_are_usage_errors(args, option, vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    """On the real budget: nothing written, exit 2, the option named."""
    out = tmp_path / "out"
    result = vizkit_cli("run", vizkit_model_file, vizkit_images, *args, "-o", out)
    assert result.exit_code == 2, result.output
    assert f"{option}: " in result.output and ("use at most" in result.output or "above the maximum" in result.output)
    assert not out.exists()


def test_values_that_cap_themselves_are_not_bounded(vizkit_cli, vizkit_model_file, vizkit_images, tmp_path):
    """filters.count and .batch stop at the layer's filters, activations.max_channels at its
    channels, a per_pass at the copies there are: huge values allocate nothing more."""
    out = tmp_path / "out"
    result = vizkit_cli(
        "run", vizkit_model_file, vizkit_images, "-t", "filters", "-t", "activations", "-t", "rise",
        "-s", "filters.count=1000000000", "-s", "filters.batch=1000000000", "-s", "filters.steps=2",
        "-s", "filters.size=16", "-s", "activations.max_channels=1000000000", "-s", "rise.masks=8",
        "-s", "rise.per_pass=1000000000", "--no-metrics", "-o", out,
    )
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file()


# -- filters: the ascent in chunks ----------------------------------------------------


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_chunked_ascent_is_byte_identical_and_traced_once(monkeypatch, param):
    """Also for fourier, whose Adam state and per-step transforms cross the calls."""
    model = build_tiny()
    made = []
    original = featureviz.ascent
    monkeypatch.setattr(featureviz, "ascent", lambda *args: made.append(original(*args)) or made[-1])
    results = {}
    for per_call in (7, 50, 1000, None):
        patterns, raw = filter_patterns(model, "conv2", filters=4, size=24, steps=50, seed=3, batch=2,
                                        steps_per_call=per_call, param=param)
        results[per_call] = (patterns, raw)
        assert made[-1].experimental_get_tracing_count() == 1, per_call  # one batch shape, any number of calls
    patterns, raw = results[50]
    start = filter_patterns(model, "conv2", filters=4, size=24, steps=0, seed=3, param=param)[1]
    assert not np.array_equal(raw, start)  # it did move
    for per_call, (other_patterns, other_raw) in results.items():
        assert other_raw.tobytes() == raw.tobytes(), per_call
        assert np.array_equal(other_patterns, patterns), per_call


def test_a_long_ascent_reports_progress(monkeypatch):
    monkeypatch.setattr(featureviz, "PROGRESS_EVERY_S", 0.0)
    messages = []
    filter_patterns(build_tiny(), "conv1", filters=2, size=16, steps=20, steps_per_call=6, progress=messages.append)
    assert messages == [
        "conv1: filters 0-1 of 2",
        "conv1: filters 0-1 of 2, step 6 of 20",
        "conv1: filters 0-1 of 2, step 12 of 20",
        "conv1: filters 0-1 of 2, step 18 of 20",
    ]


INTERRUPTIBLE = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from vizkit.cli import main; main(prog_name='vizkit')"
)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal and SIGINT")
def test_ctrl_c_stops_a_billion_steps_within_seconds(vizkit_model_file, vizkit_images, tmp_path):
    """`-s filters.steps=1000000000`: once the ascent reports its steps, SIGINT stops the
    run within 5 s, exit status 130, no report. stderr is a terminal, so progress shows."""
    import pty

    out = tmp_path / "out"
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, "run", str(vizkit_model_file), str(vizkit_images), "-t", "filters",
         "-s", "filters.steps=1000000000", "-s", "filters.size=32", "-s", "filters.count=4", "-o", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=tmp_path,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while b", step " not in seen and time.monotonic() < deadline and process.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert b", step " in seen, seen.decode(errors="replace")
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=30)
        stopped_after = time.monotonic() - interrupted
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    assert status == 130, text
    assert "interrupted; no report was written" in text
    assert stopped_after < 5, f"stopped {stopped_after:.1f} s after SIGINT"
    assert not out.exists()
