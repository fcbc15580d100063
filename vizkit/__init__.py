"""vizkit: see what a convolutional network learned, as one static HTML report.

Importing this package is cheap (no TensorFlow); the heavy modules load on first use.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("vizkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: Decorator for plugin hook implementations: ``@vizkit.hookimpl``.
hookimpl = pluggy.HookimplMarker("vizkit")

__all__ = ["__version__", "hookimpl"]
