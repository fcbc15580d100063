"""vizkit's own comparison metrics for ``vizkit compare``, registered through the public
``register_comparisons`` hook like any plugin's: Spearman's rank correlation and SSIM of
two maps (both at the smaller of the two resolutions)."""

from __future__ import annotations

import vizkit
from vizkit import kit
from vizkit.compare import ComparisonMetric


@vizkit.hookimpl
def register_comparisons(register) -> None:
    register(ComparisonMetric(
        "spearman",
        "Spearman's rank correlation of the two maps (1: the same ranking of pixels); "
        "--fail-on similarity<X tests its mean",
        kit.spearman,
        better="higher",
    ))
    register(ComparisonMetric(
        "ssim",
        "structural similarity (SSIM) of the two maps (1: identical)",
        kit.ssim,
        better="higher",
    ))
