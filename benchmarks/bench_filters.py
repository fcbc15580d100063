"""Filter patterns: vizkit's batched ascent vs the chapter's one filter at a time, and vs the CPU.

Run by hand, never in CI:

    python benchmarks/bench_filters.py                  # the chapter's full grid: 149 TFLOP, ~50 min on 2 cores
    python benchmarks/bench_filters.py --filters 8      # 8 filters per layer (vizkit: one batch of 8), ~7 min
    python benchmarks/bench_filters.py --filters 16 --skip-chapter   # vizkit's batch of 16 against the peak only
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/bench_filters.py --filters 8   # without oneDNN's kernels

The grid is the chapter's (Deep Learning with Python, 1st ed., 5.4.2): VGG16 (random
weights here: no download), the first convolution of each block, 64 filters each, 150 px,
40 steps of 1.0 on the RMS-normalized gradient. Per layer, in this order:

1. a float32 matmul, the machine's measured peak: TensorFlow's and NumPy's (BLAS) at
   1024-3072 at start-up, then whichever ran fastest, best of 5, before each layer and after
   the last, so a change of load shows; the peak is the best rate of the run;
2. vizkit: ``filter_patterns`` with ``--batch`` filters per compiled ascent;
3. the chapter: one filter at a time, as its Keras 2.2 code does it: per filter a new graph
   function (``K.function`` then, a fresh ``tf.function`` here, traced per filter) returning
   the loss and the normalized gradient, called ``--steps`` times from Python with NumPy in
   and out, ``input_img_data += grads_value * step`` in NumPy.

Both start from the same noise (``initial_inputs``) and the models are built before the
clock starts; each time includes its own tracing. The largest and the mean difference
between the two methods' optimized inputs are printed: the same computation up to float
rounding (batch 1 and batch N kernels sum in different orders), which the steps amplify
where a ReLU switches.

FLOPs are counted from the layer configurations: per image and step, every Conv2D (and
Dense) up to the layer costs its forward multiply-adds (2·H_out·W_out·k_h·k_w·C_in·C_out)
and the same again backward to its input, the first convolution included (its input is the
image the ascent differentiates). No weight gradients are counted (none are needed or
computed); pooling, bias and ReLU are not counted (under 1% of the FLOPs, though
memory-bound: they are much of block1_conv1's time). bfloat16 is not measured: the script
says whether the hardware has it (AVX-512 BF16, AMX or a GPU).

It prints a Markdown table per layer (% of the run's peak and of the matmul timed beside
the layer) and whether the issue's two targets are met. The machine is shared: compare the ratios printed by one run, not seconds between runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from vizkit.tensorflow_setup import start_tensorflow

start_tensorflow()  # TensorFlow as a vizkit run starts it (oneDNN kernels on unless TF_ENABLE_ONEDNN_OPTS says no)

from vizkit.models import load_model
from vizkit.plugins.filters import filter_patterns, initial_inputs

LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")
#: The issue's targets: chapter time / vizkit time, and vizkit's FLOP/s / the matmul peak.
TARGET_SPEEDUP = 2.5
TARGET_PEAK_FRACTION = 0.80
MATMUL_SIZES = (1024, 2048, 3072)


# -- the machine ----------------------------------------------------------------------------


def cpu_description() -> tuple[str, set[str]]:
    """(model name and core count, the CPU's feature flags) from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores", flags


def bfloat16_note(flags: set[str]) -> str:
    """Whether bfloat16 could run natively here (AVX-512 BF16, AMX or a GPU)."""
    import tensorflow as tf

    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if tf.config.list_physical_devices("GPU"):
        return "bfloat16: a GPU is present; mixed precision not measured by this script"
    if native:
        return f"bfloat16: the CPU has {', '.join(native)}; mixed precision not measured by this script"
    return "bfloat16: skipped, the hardware lacks it (no AVX-512 BF16, no AMX, no GPU): it would be emulated, slower than float32"


def onednn_state(flags: set[str]) -> str:
    """Whether TensorFlow runs its oneDNN kernels: TF_ENABLE_ONEDNN_OPTS, read once when it
    starts, else its Linux default (on only for CPUs with the features below)."""
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if setting is not None:
        return f"oneDNN kernels {'on' if setting.lower() in ('1', 'true') else 'off'} (TF_ENABLE_ONEDNN_OPTS={setting})"
    default = flags & {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    why = f"the CPU has {', '.join(sorted(default))}" if default else "no AVX-512 VNNI/BF16, AVX-VNNI or AMX"
    return f"oneDNN kernels {'on' if default else 'off'} (TF_ENABLE_ONEDNN_OPTS unset, TensorFlow's default: {why})"


def matmul_rate(engine: str, n: int, repeat: int) -> float:
    """FLOP/s of a float32 n×n matmul, best of ``repeat`` after a warm-up: ``tf`` (compiled
    ``tf.matmul``) or ``numpy`` (NumPy's BLAS)."""
    import tensorflow as tf

    a, b = tf.random.uniform((n, n), seed=1), tf.random.uniform((n, n), seed=2)
    multiply = tf.function(tf.matmul) if engine == "tf" else lambda a, b: a @ b
    if engine == "numpy":
        a, b = a.numpy(), b.numpy()
    np.asarray(multiply(a, b))
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        np.asarray(multiply(a, b))
        best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best


# -- the workload ---------------------------------------------------------------------------


def conv_base(model, layers: list[str]) -> dict:
    """The chapter's ``VGG16(include_top=False)``: per layer of ``layers``, a model from an
    input of any size to it through the model's own layers (weights shared)."""
    import keras

    x = inputs = keras.Input((None, None, model.inputs[0].shape[-1]))
    tensors = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = tensors[layer.name] = layer(x)
        if set(layers) <= set(tensors):
            break
    return {name: keras.Model(inputs, tensors[name]) for name in layers}


def step_flops(model, layer: str, size: int) -> float:
    """FLOPs of one ascent step of one image: forward to ``layer`` and backward to the input."""
    import keras

    shape, forward = (1, size, size, model.inputs[0].shape[-1]), 0
    for each in model.layers:
        if isinstance(each, keras.layers.InputLayer):
            continue
        out = each.compute_output_shape(shape)
        if isinstance(each, keras.layers.Conv2D):
            kernel = int(np.prod(each.kernel_size))
            forward += 2 * int(np.prod(out[1:3])) * kernel * shape[-1] // each.groups * each.filters
        elif isinstance(each, keras.layers.Dense):
            forward += 2 * int(np.prod(shape[1:])) * each.units
        shape = out
        if each.name == layer:
            return 2 * forward  # backward to the input: the same multiply-adds again
    raise KeyError(layer)


def chapter_iterate(sub, filter_index: int):
    """``generate_pattern``'s graph for one filter: (loss, normalized gradient) of an input."""
    import tensorflow as tf

    @tf.function
    def iterate(input_img):
        with tf.GradientTape() as tape:
            tape.watch(input_img)
            loss = tf.reduce_mean(sub(input_img)[:, :, :, filter_index])
        grads = tape.gradient(loss, input_img)
        grads /= tf.sqrt(tf.reduce_mean(tf.square(grads))) + 1e-5
        return loss, grads

    return iterate


def chapter_patterns(sub, start: np.ndarray, steps: int, step: float) -> np.ndarray:
    """The chapter's loop: filter after filter, a new graph each, NumPy between steps."""
    optimized = []
    for filter_index, noise in enumerate(start):
        iterate = chapter_iterate(sub, filter_index)
        input_img_data = noise[None].copy()
        for _ in range(steps):
            loss_value, grads_value = (value.numpy() for value in iterate(input_img_data))
            input_img_data += grads_value * step
        optimized.append(input_img_data[0])
    return np.stack(optimized)


def timed(call):
    """(what ``call()`` returns, its seconds)."""
    began = time.perf_counter()
    result = call()
    return result, time.perf_counter() - began


# -- the run --------------------------------------------------------------------------------


def run_layer(model, layer: str, start: np.ndarray, sub, args) -> dict:
    """One layer of the grid: vizkit, then the chapter (unless ``sub`` is None), timed."""
    count = min(args.filters, model.get_layer(layer).filters)
    start = start[:count]
    row = {"layer": layer, "count": count, "work": step_flops(model, layer, args.size) * count * args.steps}
    (_, raw), row["vizkit"] = timed(
        lambda: filter_patterns(
            model, layer, filters=count, size=args.size, steps=args.steps, step=args.step, start=start, batch=args.batch
        )
    )
    if sub is not None:
        chapter, row["chapter"] = timed(lambda: chapter_patterns(sub, start, args.steps, args.step))
        row["difference"] = float(np.abs(chapter - raw).max())
        row["mean_difference"] = float(np.abs(chapter - raw).mean())
        row["moved"] = float(np.abs(raw - start).max())
    return row


def print_table(rows: list[dict], peak: float, steps: int, chapter: bool) -> None:
    """The per-layer table (Markdown) and its total. "% beside" divides by the better of the
    matmuls timed just before and after the layer (the load of the moment), "% of peak" by
    the best of the run; the total's "% beside" weighs the layers by their work."""
    columns = ["layer", "GFLOP per image-step", "work (TFLOP)", "vizkit s", "vizkit GFLOP/s", "% of peak", "% beside"]
    if chapter:
        columns += ["chapter s", "chapter / vizkit", "difference: max, mean (largest move)"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    total = {key: sum(r[key] for r in rows) for key in ("work", "vizkit", "at_beside")} | {"layer": "all"}
    if chapter:
        total["chapter"] = sum(r["chapter"] for r in rows)
        total["difference"] = max(r["difference"] for r in rows)
        total["mean_difference"] = sum(r["mean_difference"] * r["count"] for r in rows) / sum(r["count"] for r in rows)
        total["moved"] = max(r["moved"] for r in rows)
    for row in [*rows, total]:
        rate = row["work"] / row["vizkit"]
        per_image = f"{row['work'] / row['count'] / steps / 1e9:.2f}" if "count" in row else ""
        cells = [
            row["layer"], per_image, f"{row['work'] / 1e12:.2f}", f"{row['vizkit']:.1f}",
            f"{rate / 1e9:.0f}", f"{rate / peak:.0%}", f"{row['at_beside'] / row['vizkit']:.0%}",
        ]
        if chapter:
            cells += [
                f"{row['chapter']:.1f}",
                f"{row['chapter'] / row['vizkit']:.2f}×",
                f"{row['difference']:.2g}, {row['mean_difference']:.2g} ({row['moved']:.3g})",
            ]
        print("| " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filters", type=int, default=64, help="filters per layer, from the first (default 64)")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma list of VGG16 conv layers")
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=16, help="vizkit's filters per compiled ascent")
    parser.add_argument("--skip-chapter", action="store_true", help="vizkit and the matmul peak only")
    args = parser.parse_args()
    layers = args.layers.split(",")

    model = load_model("vgg16", weights="none").model
    import keras
    import tensorflow as tf

    import vizkit

    cpu, flags = cpu_description()
    threads = tf.config.threading
    print(f"{datetime.date.today()}  {cpu}  {platform.system()} {platform.release()}")
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {onednn_state(flags)}, threads intra/inter "
        f"{threads.get_intra_op_parallelism_threads()}/{threads.get_inter_op_parallelism_threads()} (0: TensorFlow's choice)"
    )
    print(bfloat16_note(flags))
    print(
        f"VGG16 (random weights), {args.filters} filters × {args.steps} steps of {args.step:g} at {args.size} px, "
        f"vizkit batch {min(args.batch, args.filters)}, layers {', '.join(layers)}"
    )

    rates = {(engine, n): matmul_rate(engine, n, repeat=3) for engine in ("tf", "numpy") for n in MATMUL_SIZES}
    fastest = max(rates, key=rates.get)
    print("matmul float32 GFLOP/s: " + ", ".join(f"{e} {n}: {rate / 1e9:.0f}" for (e, n), rate in rates.items()))

    subs = {} if args.skip_chapter else conv_base(model, layers)
    vizkit.ModelGraph.of(model).free_size()  # vizkit's traced graph (kept), built before the clock as the chapter's models
    start = initial_inputs(args.filters, args.size, model.inputs[0].shape[-1], seed=0)
    print(f"load average {os.getloadavg()[0]:.2f}")
    peaks, rows = [], []
    for layer in layers:
        peaks.append(matmul_rate(*fastest, repeat=5))
        row = run_layer(model, layer, start, subs.get(layer), args)
        rows.append(row)
        chapter = "" if args.skip_chapter else f", chapter {row['chapter']:.1f} s, max |difference| {row['difference']:.2g}"
        print(
            f"  {layer}: {row['work'] / 1e12:.2f} TFLOP, vizkit {row['vizkit']:.1f} s{chapter}, "
            f"matmul before {peaks[-1] / 1e9:.0f} GFLOP/s, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    peaks.append(matmul_rate(*fastest, repeat=5))
    for row, before, after in zip(rows, peaks, peaks[1:]):
        row["at_beside"] = row["work"] / max(before, after)  # seconds at the matmul rate of the moment
    peak = max(peaks + list(rates.values()))
    print(
        f"matmul {fastest[0]} {fastest[1]} around the layers: {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s; "
        f"peak (best of the run) {peak / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print_table(rows, peak, args.steps, chapter=not args.skip_chapter)
    print()
    work, vizkit_s = sum(r["work"] for r in rows), sum(r["vizkit"] for r in rows)
    if not args.skip_chapter:
        speedup = sum(r["chapter"] for r in rows) / vizkit_s
        print(f"target chapter / vizkit ≥ {TARGET_SPEEDUP}×: {speedup:.2f}×, {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}")
    fraction = work / vizkit_s / peak
    print(
        f"target vizkit ≥ {TARGET_PEAK_FRACTION:.0%} of the matmul peak: {work / vizkit_s / 1e9:.0f} of "
        f"{peak / 1e9:.0f} GFLOP/s = {fraction:.0%}, {'met' if fraction >= TARGET_PEAK_FRACTION else 'NOT met'} "
        f"({sum(r['at_beside'] for r in rows) / vizkit_s:.0%} of the matmul timed beside each layer)"
    )


if __name__ == "__main__":
    main()
