"""Where a PyTorch weight sits in an exported graph's initializer, and how to change it there.

The manifest's component entries of `unet`, `text_encoder` and `text_encoder_2` carry `weights`: for each
PyTorch parameter name, an entry `{"initializer": NAME, "steps": [...], "view": [...], "at": [...]}`. Its
steps ("transpose", "reshape", "pad" with zeros) take a tensor in PyTorch's layout to the layout of a block
of the initializer G, and that block is `G.reshape(view)[index(at)]` (`at` per axis: None the whole axis,
an int that index, [start, stop] that slice). This module is the one definition of that recipe: the
exporter checks its maps with it, and run-time LoRA and textual inversion change initializers with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InvalidArgument


def transformed(tensor: np.ndarray, entry: Mapping) -> np.ndarray:
    """`tensor` (PyTorch's layout: the weight itself or a delta of its shape) as float32, after the entry's
    steps: the layout of its block in the graph's initializer."""
    out = np.asarray(tensor, dtype=np.float32)
    for op, argument in entry.get("steps") or ():
        if op == "transpose":
            out = np.transpose(out, argument)
        elif op == "reshape":
            out = np.reshape(out, argument)
        elif op == "pad":
            out = np.pad(out, argument)
        else:
            raise ValueError(f"unknown weight placement step '{op}'")
    return out


def _index(at: Sequence) -> tuple:
    return tuple(
        slice(None) if a is None else slice(a[0], a[1]) if isinstance(a, (list, tuple)) else int(a) for a in at
    )


def placement(entry: Mapping, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple]:
    """(view, index): the entry's block of an initializer of this shape is `G.reshape(view)[index]`."""
    view = tuple(entry.get("view") or shape)
    at = entry.get("at") or [None] * len(view)
    if len(at) != len(view) or int(np.prod(view, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"weight placement view {list(view)} / at {list(at)} does not fit an initializer {shape}")
    return view, _index(at)


def _check_placed(entry: Mapping) -> None:
    if entry.get("initializer") is None:
        raise InvalidArgument(f"this weight is not in the exported graph ({entry.get('why', 'not found')})")


def read_placed(initializer: np.ndarray, entry: Mapping) -> np.ndarray:
    """The entry's block of the initializer, as float32, in the graph's layout: equal to
    `transformed(weight, entry)` up to the initializer's dtype."""
    _check_placed(entry)
    view, index = placement(entry, initializer.shape)
    return np.asarray(initializer).reshape(view)[index].astype(np.float32)


def add_to_initializer(initializer: np.ndarray, entry: Mapping, delta: np.ndarray) -> np.ndarray:
    """A new array in the initializer's dtype and shape: the initializer plus `delta` (PyTorch's layout, the
    weight's shape) added to the entry's block, in float32 before rounding back. The initializer is not
    changed (it may be a read-only memory map)."""
    _check_placed(entry)
    view, index = placement(entry, initializer.shape)
    total = np.array(initializer, dtype=np.float32)  # a copy, also when it is float32 already
    total.reshape(view)[index] += _fitted(delta, entry, total.reshape(view)[index].shape)
    return total.astype(initializer.dtype, copy=False)


def _fitted(tensor: np.ndarray, entry: Mapping, block: tuple[int, ...]) -> np.ndarray:
    """The tensor after the steps, refused in one line when it does not fit the block."""
    try:
        out = transformed(tensor, entry)
    except ValueError:
        out = None
    if out is None or out.shape != block:
        raise InvalidArgument(
            f"a tensor of shape {list(np.shape(tensor))} does not fit initializer '{entry['initializer']}' "
            f"(block {list(block)}): it is not the shape of the weight this placement is for"
        )
    return out


def set_placed(initializer: np.ndarray, entry: Mapping, value: np.ndarray) -> np.ndarray:
    """A new array in the initializer's dtype and shape whose block is `value` (PyTorch's layout)."""
    _check_placed(entry)
    view, index = placement(entry, initializer.shape)
    total = np.array(initializer, dtype=np.float32)
    total.reshape(view)[index] = _fitted(value, entry, total.reshape(view)[index].shape)
    return total.astype(initializer.dtype, copy=False)
