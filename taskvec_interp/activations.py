"""Captured activations that know their layers.

``adapter.capture(prompts, layers=[5, 15])`` returns an :class:`Activations`: a ``torch.Tensor``
``[layer, prompt, (m,) d_model]`` whose first index is the LAYER NUMBER, so the natural code is the correct
code::

    acts = model.capture(prompts, layers=[5, 15])
    acts[15]          # layer 15's [prompt, d_model] (not list position 15)
    acts[15, 0]       # layer 15, first prompt
    acts.layers       # [5, 15]
    acts.tensor       # the plain tensor, indexed by position

Only indexing (and assigning) by an int (or a tuple starting with one) is by layer number; a negative int counts from the
last captured layer, and a layer that was not captured raises ``ValueError`` naming it and the captured layers.
Slices, lists and tensors index positions, as on any tensor. Every other operation (arithmetic, ``torch``
functions, ``.mean(0)``) works as on the plain tensor and returns a plain tensor, so nothing downstream carries
stale layer numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _plain(obj: object) -> object:
    if isinstance(obj, Activations):
        return obj.as_subclass(Tensor)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_plain(o) for o in obj)
    return obj


class Activations(Tensor):
    """A ``[layer, ...]`` tensor indexed by layer number at its first axis (see the module doc)."""

    layers: list[int]

    @staticmethod
    def __new__(cls, data: Tensor, layers: Sequence[int]) -> Activations:
        layers = [int(x) for x in layers]
        if data.ndim < 1 or data.shape[0] != len(layers):
            raise ValueError(f"activations of shape {list(data.shape)} for {len(layers)} layers {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers listed twice: {layers}")
        out = data.as_subclass(cls)
        out.layers = layers
        return out

    @property
    def tensor(self) -> Tensor:
        """The plain tensor, indexed by position."""
        return self.as_subclass(Tensor)

    def position(self, layer: int) -> int:
        """The first-axis position of ``layer`` (a negative one counts from the last captured layer);
        ``ValueError`` naming the layer and the captured layers if there is none."""
        if layer < 0:
            if -layer > len(self.layers):
                raise ValueError(f"layer {layer} is out of range: {len(self.layers)} layers were captured "
                                 f"(captured layers: {self.layers})")
            return len(self.layers) + layer
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured (captured layers: {self.layers})")
        return self.layers.index(layer)

    def __getitem__(self, index):
        return self.tensor[self._map(index)]

    def __setitem__(self, index, value) -> None:
        self.tensor[self._map(index)] = value

    def _map(self, index):
        if isinstance(index, int) and not isinstance(index, bool):
            return self.position(index)
        if isinstance(index, tuple) and index and isinstance(index[0], int) and not isinstance(index[0], bool):
            return (self.position(index[0]), *index[1:])
        return index

    def __iter__(self):
        return iter(self.tensor)

    def items(self):
        """``(layer, [prompt, ..., d_model])`` pairs in capture order."""
        return zip(self.layers, self.tensor, strict=True)

    def __repr__(self) -> str:
        return f"Activations(layers={self.layers}, shape={list(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*_plain(args), **{k: _plain(v) for k, v in (kwargs or {}).items()})
        return _plain(out)

    def __deepcopy__(self, memo):
        return Activations(self.tensor.clone(), list(self.layers))

    def __reduce_ex__(self, proto):
        return (Activations, (self.tensor.clone(), self.layers))
