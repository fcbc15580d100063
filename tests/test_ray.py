"""``--executor ray``: chunks explained by Ray Data actors give the report the in-process
loop gives, byte for byte (bar the ``executor`` field), on a real local Ray instance;
what Ray workers could not repeat is a UsageError before any work."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="--executor ray needs Ray Data: pip install 'vizkit[ray]'")
pytest.importorskip("ray.data", reason="--executor ray needs Ray Data: pip install 'vizkit[ray]'")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray Data's own settings

from conftest import write_image  # noqa: E402
from vizkit import host  # noqa: E402
from vizkit.runner import RunOptions, UsageError, run  # noqa: E402
from vizkit.samples import sample_photos  # noqa: E402

#: Three chunks of two: the three sample photos and three small written images.
CHUNK = 2

#: A plugin that loads in the driver but not in a Ray actor: a worker that cannot set up the run.
DRIVER_ONLY_PLUGIN = '''
import ray

if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
    raise RuntimeError("this plugin does not load on Ray workers")
'''


@pytest.fixture(scope="module")
def photos(workdir) -> Path:
    folder = workdir / "photos"
    folder.mkdir()
    for photo in sample_photos():
        shutil.copy(photo, folder / Path(photo).name)
    for seed, name in enumerate(["d.png", "e.jpg", "f.png"], start=1):
        write_image(folder / name, size=(48 + 8 * seed, 40), seed=seed)
    return folder


def options(layout: str = "single", **changes) -> RunOptions:
    return RunOptions(
        techniques=["gradcam", "activations"], metrics=["faithfulness"],
        settings={"faithfulness": {"steps": 4}, "activations": {"max_channels": 4}},
        layout=layout, chunk=CHUNK, save_arrays=True, **changes,
    )


def driver_must_not_explain(*args, **kwargs):
    raise AssertionError("--executor ray explained a chunk in the driver")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_ray_gives_the_in_process_report(layout, photos, model_file, workdir, monkeypatch, request):
    """Three chunks over two actors. ``folder``: the run starts (and stops) its own local
    Ray instance; ``single``: it uses the one the calling program started, and leaves it."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    monkeypatch.chdir(workdir)  # relative paths, as given on a command line: the report keeps them so
    out = Path(layout)
    began = time.perf_counter()
    run(model_file.name, [photos.name], options(layout), out / "in-process")
    middle = time.perf_counter()
    if layout == "single":
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        request.addfinalizer(ray.shutdown)
    monkeypatch.setattr("vizkit.runner.explain_chunk", driver_must_not_explain)  # the actors do it
    report, _ = run(model_file.name, [photos.name], options(layout, executor="ray", workers=2), out / "ray")
    print(f"{layout}: in-process {middle - began:.1f}s, ray {time.perf_counter() - middle:.1f}s (6 images)")
    assert ray.is_initialized() == (layout == "single")
    assert report.executor == "ray" and len(report.images) == 6
    assert all(image.status == "ok" and not os.path.isabs(image.path) for image in report.images)
    here, there = files(out / "in-process"), files(out / "ray")
    assert sorted(here) == sorted(there)
    if layout == "folder":
        assert len([name for name in here if name.endswith(".png")]) > 6
    records = [json.loads(found.pop("report.json")) for found in (here, there)]
    assert [record.pop("executor") for record in records] == ["in-process", "ray"]
    assert records[0] == records[1]
    assert [name for name in here if here[name] != there[name]] == []  # index.html, pages, pictures, arrays


def test_a_worker_that_cannot_set_up_the_run_is_a_usage_error(model_file, photos, workdir):
    plugin = workdir / "driver_only.py"
    plugin.write_text(DRIVER_ONLY_PLUGIN)
    with pytest.raises(UsageError, match="a Ray worker cannot set up the run: .*does not load on Ray workers"):
        run(str(model_file), [photos], options(executor="ray", workers=1, plugins=[str(plugin)]),
            workdir / "refused")
    assert not ray.is_initialized()  # the instance the run started is gone


def test_a_plugin_host_object_is_a_usage_error(model_file, photos, workdir):
    with pytest.raises(UsageError, match=r"RunOptions\.plugins"):
        run(str(model_file), [photos], options(executor="ray"), workdir / "no", pm=host.plugin_manager())
    assert not (workdir / "no").exists()


def test_a_keras_model_object_is_a_usage_error(tiny_model, photos, workdir):
    with pytest.raises(UsageError, match=r"model\.save"):
        run(tiny_model, [photos], options(executor="ray"), workdir / "no-model")
    assert not (workdir / "no-model").exists()
