"""What a technique knows of a model's layer: plain data, importable without Keras."""

from __future__ import annotations

from dataclasses import dataclass


class LayerError(KeyError):
    """A layer name that the model does not have, or that a technique cannot use."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class LayerInfo:
    path: str
    kind: str  # the layer's class name
    shape: tuple  # output shape without the batch axis
    nested_model: bool
    feeds_output: bool = True  # on a path to the output that is explained

    @property
    def spatial(self) -> bool:
        """A feature-map layer (batch, height, width, channels)."""
        return len(self.shape) == 3

    @property
    def feature_map(self) -> bool:
        """A layer of its own with a feature-map output (a nested model is its layers)."""
        return self.spatial and not self.nested_model

    @property
    def conv(self) -> bool:
        return self.spatial and "Conv" in self.kind and not self.nested_model

    @property
    def pooling(self) -> bool:
        return self.spatial and "Pooling" in self.kind
