"""Where a run's chunks are explained: ``--executor ray`` maps them over a Ray cluster.

The in-process loop of :func:`vizkit.runner.run` explains one chunk after another;
with ``RunOptions(executor="ray")`` the chunks become the rows of a Ray Data dataset
mapped by a pool of actors (``workers`` of them, model replicas). Each actor rebuilds
the run's :class:`vizkit.chunk.Job` once, from the run's own arguments, on the same
code path as the driver (:func:`vizkit.runner.plan`, :func:`vizkit.runner.build_job`),
so a chunk gives the same :class:`vizkit.chunk.ChunkResult` wherever it runs; results
come back pickled, in the order they finish, and the report writer puts them in order.

What a worker needs, and why:

- The model is a spec (a name or a file), not a ``keras.Model`` object: the worker
  loads it as ``vizkit run`` would. A model object could only travel saved and
  reloaded, which loses custom layers, can guess other preprocessing than the object
  did, and would no longer be the same code path: save it (``model.save("m.keras")``)
  and pass the path.
- Plugins are named in ``RunOptions.plugins`` (``-p``), not handed in as a plugin host
  object: the worker builds its own host from the names.
- Paths (the images, a model file, ``--labels``, plugin files) go absolute and are
  opened by the workers: on a local Ray instance they share the driver's file system;
  on a remote cluster they must exist on every worker node at the same absolute paths
  (a shared or synced folder), and vizkit must be installed there (with the same
  versions, for the same numbers). The report lists the paths as the run was given them.
- The environment that changes the numbers or the plugins travels with the actors
  (:func:`worker_env`): ``SOURCE_DATE_EPOCH``, ``CUDA_VISIBLE_DEVICES`` and the
  ``TF_*``, ``KERAS_*`` and ``VIZKIT_*`` variables of the driver.

``address`` None starts a local Ray instance for the run, shut down when the run ends;
else the run connects to that cluster (and disconnects after). If the calling program
has already called ``ray.init()``, that session is used and left as it is.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import replace
from pathlib import Path

#: Variables of the driver every worker gets: they change the numbers (oneDNN kernels,
#: op determinism via SOURCE_DATE_EPOCH, the devices) or the plugins loaded.
ENV_NAMES = ("SOURCE_DATE_EPOCH", "CUDA_VISIBLE_DEVICES", "XDG_CACHE_HOME")
ENV_PREFIXES = ("TF_", "KERAS_", "VIZKIT_")
#: Default model replicas: one per GPU of the cluster; without GPUs, one per this many
#: CPUs (at least 2, where there are 2 CPUs): TensorFlow's own threads use a few cores
#: well, and a replica per core would hold the model that many times.
CPUS_PER_WORKER = 4


def check_ray(options, model, pm) -> None:
    """UsageError, before any work, for a run Ray workers could not repeat."""
    from vizkit.runner import UsageError

    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--executor ray needs Ray Data: pip install 'vizkit[ray]'") from None
    if pm is not None:
        raise UsageError(
            "--executor ray: Ray workers load plugins by name, not from a plugin host object: "
            "pass them in RunOptions.plugins (-p) instead of pm"
        )
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(
            f"--executor ray: Ray workers load the model from a spec, not a {type(model).__name__} object: "
            "save it (model.save('model.keras')) and pass the file's path, or use --executor in-process"
        )
    if options.workers is not None and options.workers < 1:
        raise UsageError(f"--workers {options.workers}: give a number of model replicas of at least 1")


def ray_results(model, options, chunks: list, pending: list[int], weights: str):
    """The ``pending`` chunks explained by Ray actors: ChunkResults as they finish.
    ``weights``: the SHA-256 of the driver's model weights (``runner.weights_sha256``);
    a worker whose model differs (random weights drawn again) refuses the run."""
    if not pending:  # a resumed run that had finished them all
        return
    import ray.data

    from vizkit.runner import UsageError

    started = not ray.is_initialized()
    if started:  # a local instance's start-up notices concern nothing the user set up
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=True,
                     ignore_reinit_error=True, logging_level="WARNING" if options.address else "ERROR")
        except ConnectionError as error:  # an OSError: not to be taken for a full disk
            raise UsageError(f"--executor ray: cannot reach the Ray cluster at {options.address or 'a local instance'}: "
                             f"{error}") from None
    try:
        with _quiet_ray_data(ray.data.DataContext.get_current()):
            yield from _map(ray, model, options, chunks, pending, weights)
    finally:
        if started:
            ray.shutdown()


def _map(ray, model, options, chunks: list, pending: list[int], weights: str):
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU") or 1.0, resources.get("GPU", 0.0)  # no CPU yet: an autoscaling cluster
    default = int(gpus) or min(max(2, int(cpus) // CPUS_PER_WORKER), max(1, int(cpus)))
    workers = max(1, min(options.workers or default, len(pending)))
    env = worker_env()
    actor = {"num_cpus": cpus / workers}  # the cores split between the replicas (TensorFlow threads)
    if gpus:  # replicas share the GPUs; each grows its memory instead of taking all of it
        actor["num_gpus"] = min(1.0, gpus / workers)
        env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    rows = [{"index": i, "files": pickle.dumps([(image_id, _absolute(path)) for image_id, path in chunks[i]])}
            for i in pending]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(  # a block per chunk
        ChunkActor,
        fn_constructor_kwargs={"model": _absolute(model), "options": _shipped(options),
                               "threads": max(1, int(actor["num_cpus"])), "weights": weights},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        runtime_env={"env_vars": env},
        **actor,
    )
    for row in dataset.iter_rows():
        if row["error"]:
            from vizkit.runner import UsageError

            raise UsageError(f"--executor ray: a Ray worker cannot set up the run: {row['error']} "
                             "(paths must exist on every worker node, plugins and modules import there)")
        result = pickle.loads(row["result"])
        for record, (_, path) in zip(result.images, chunks[result.index]):
            _name_as_given(record, path)
        yield result


@contextlib.contextmanager
def _quiet_ray_data(context):
    """Ray Data on the terminal without its progress bars and INFO lines (vizkit's own
    progress counts the images), its warnings kept: an actor that cannot be placed says
    so. Its log file keeps everything."""
    import logging

    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    screens = [h for h in logging.getLogger("ray.data").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in screens:
        handler.addFilter(_quiet)
    try:
        yield
    finally:
        context.enable_progress_bars = saved
        for handler in screens:
            handler.removeFilter(_quiet)


def _quiet(record) -> bool:
    """Warnings and errors, but not the notice that the progress bars are off (vizkit did that)."""
    return record.levelno >= 30 and not record.getMessage().startswith("Progress bars disabled")


class ChunkActor:
    """A model replica: builds the run's Job once, then explains one chunk per call.

    A run the worker cannot set up (a plugin it cannot import, a model file or labels
    missing on its node) answers every chunk with the message, which the driver raises
    as a UsageError: Ray's own error for a failed actor would bury it in tracebacks.
    """

    def __init__(self, model, options, threads: int, weights: str):
        from vizkit import runner
        from vizkit.labels import LabelsError, read_labels
        from vizkit.tensorflow_setup import start_tensorflow

        start_tensorflow()
        import tensorflow as tf

        # Ray gives the actor ``threads`` CPUs; TensorFlow would use every core of the node.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.job, self.error = None, ""
        try:
            planned = runner.plan(options)
            labels = read_labels(options.labels) if options.labels else None
            _, _, self.job, _ = runner.build_job(model, options, planned, labels)
        except (runner.UsageError, LabelsError) as error:
            self.error = str(error) or type(error).__name__
            return
        if runner.weights_sha256(self.job.graph.model) != weights:
            self.error = (
                "the model a Ray worker loaded has other weights than vizkit's (random weights drawn again, "
                "or another file on its node): set SOURCE_DATE_EPOCH for seeded weights, or save the model "
                "to a file every node reads"
            )

    def __call__(self, batch: dict) -> dict:
        from vizkit.chunk import explain_chunk

        results = [
            b"" if self.job is None else
            pickle.dumps(explain_chunk(self.job, int(index), pickle.loads(files)), protocol=pickle.HIGHEST_PROTOCOL)
            for index, files in zip(batch["index"], batch["files"])
        ]
        return {"result": results, "error": [self.error] * len(results)}


def worker_env() -> dict[str, str]:
    """The driver's variables that workers must share (:data:`ENV_NAMES`, :data:`ENV_PREFIXES`)."""
    return {name: value for name, value in os.environ.items()
            if name in ENV_NAMES or name.startswith(ENV_PREFIXES)}


def _shipped(options):
    """The options as a worker needs them: paths absolute, reproducibility decided here."""
    return replace(
        options,
        labels=None if options.labels is None else Path(_absolute(options.labels)),
        plugins=[_absolute(spec) for spec in options.plugins],
        reproducible=options.is_reproducible,
    )


def _absolute(spec):
    """A path that exists here, absolute; anything else (a model name, a module) as it is."""
    try:
        exists = os.path.exists(spec)
    except (TypeError, ValueError):
        return spec
    if not exists:
        return spec
    full = os.path.abspath(spec)
    return Path(full) if isinstance(spec, Path) else full


def _name_as_given(record, path: Path) -> None:
    """The image's path in the report as the run was given it, not as the worker opened it."""
    from vizkit.safe_read import path_bytes, report_path

    record.path, record.path_bytes = report_path(path), path_bytes(path)
