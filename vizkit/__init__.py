"""vizkit: see what a convolutional network learned, as one static HTML report.

The public API for plugin authors and notebooks is what this package exports (see
``docs/api.md``). Importing it is cheap: no TensorFlow, and the names load on first use.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("vizkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Decorator for plugin hook implementations: ``@vizkit.hookimpl``.
hookimpl = pluggy.HookimplMarker("vizkit")

#: Public name → the module that defines it, imported when the name is first used.
_LAZY = {
    "Artifact": "vizkit.technique",
    "Batch": "vizkit.technique",
    "Option": "vizkit.technique",
    "OptionError": "vizkit.technique",
    "RunContext": "vizkit.technique",
    "Technique": "vizkit.technique",
    "Column": "vizkit.metric",
    "Curve": "vizkit.metric",
    "Explanation": "vizkit.metric",
    "Measurement": "vizkit.metric",
    "Metric": "vizkit.metric",
    "LoadedImage": "vizkit.images",
    "ModelLoader": "vizkit.extension",
    "ReportSection": "vizkit.extension",
    "LoadedModel": "vizkit.models",
    "ModelLoadError": "vizkit.models",
    "ModelGraph": "vizkit.graph",
    "LayerInfo": "vizkit.layers",
    "LayerError": "vizkit.layers",
    "ExitCode": "vizkit.exitcodes",
    "ComparisonMetric": "vizkit.compare",
    "Report": "vizkit.report",
    "RunOptions": "vizkit.runner",
    "UsageError": "vizkit.runner",
    "run": "vizkit.runner",
    "kit": "vizkit.kit",
    "featureviz": "vizkit.featureviz",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vizkit' has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if name in ("kit", "featureviz") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
