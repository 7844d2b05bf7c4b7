"""Import and export of reference (PyTorch) weights for ``tttla_jax.nn`` layers.

Pretrained checkpoints of the reference implementations (the official PyTorch TTT
``ttt.py``, LaCT's ``lact_model``) name their tensors the PyTorch way
(``q_proj.weight``, ``W1``, ``ttt_norm_weight``, ...), store ``nn.Linear`` weights as
``[out, in]`` and may lay fast weights out per head. This module maps such a dict of
numpy arrays onto a layer's parameters and back.

Protocol. A layer that can be ported defines::

    def reference_weight_map(self) -> dict[str, tuple[tuple, Callable, Callable]]:
        return {"q_proj.weight": (("q_proj", "kernel"), torch_linear_to_jax, jax_to_torch_linear),
                ...}

mapping every reference parameter name to ``(path, to_jax, to_torch)``:

* ``path`` — attribute path of the ``nnx.Variable`` inside the layer, e.g.
  ``("q_proj", "kernel")``; integer elements index lists (``("layers", 0, "mixer", ...)``).
* ``to_jax(np_array) -> array`` — reference layout → the variable's layout.
* ``to_torch(array) -> np_array`` — the variable's layout → reference layout (the
  inverse of ``to_jax``).

Models build their map from their children's maps with :func:`prefixed_weight_map`
(e.g. ``"layers.0."`` + the mixer's names), so nesting needs no special support here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "load_reference_weights", "export_reference_weights", "prefixed_weight_map",
    "identity", "torch_linear_to_jax", "jax_to_torch_linear", "WeightMap",
]

#: name -> (attribute path, to_jax, to_torch)
WeightMap = dict  # dict[str, tuple[tuple, Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]]


def identity(a):
    """Same layout on both sides."""
    return a


def torch_linear_to_jax(w):
    """``torch.nn.Linear.weight`` ``[out, in]`` → ``nnx.Linear.kernel`` ``[in, out]``."""
    return np.asarray(w).T


def jax_to_torch_linear(kernel):
    """``nnx.Linear.kernel`` ``[in, out]`` → ``torch.nn.Linear.weight`` ``[out, in]``."""
    return np.asarray(kernel).T


def prefixed_weight_map(prefix: str, path: tuple, child_map: Mapping) -> WeightMap:
    """Lift a child module's weight map into its parent.

    Args:
      prefix: prepended to every reference name (e.g. ``"layers.0."``).
      path: attribute path of the child inside the parent (e.g. ``("layers", 0, "mixer")``).
      child_map: the child's ``reference_weight_map()``.

    Returns:
      ``{prefix + name: (path + child_path, to_jax, to_torch)}``.
    """
    return {prefix + name: (tuple(path) + tuple(p), tj, tt) for name, (p, tj, tt) in child_map.items()}


def _weight_map(layer) -> WeightMap:
    fn = getattr(layer, "reference_weight_map", None)
    if fn is None or not callable(fn):
        raise ValueError(
            f"layer: {type(layer).__name__} defines no reference_weight_map(); only layers that "
            f"implement the reference-weight protocol (see tttla_jax.nn.weights) can be ported")
    wmap = fn()
    if not isinstance(wmap, Mapping):
        raise ValueError(f"layer: {type(layer).__name__}.reference_weight_map() must return a dict, "
                         f"got {type(wmap).__name__}")
    return dict(wmap)


def _resolve(layer, path: tuple, name: str) -> nnx.Variable:
    obj = layer
    for part in path:
        try:
            obj = obj[part] if isinstance(part, int) else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise ValueError(
                f"layer: reference_weight_map entry {name!r} points at path {path}, which does not "
                f"exist in {type(layer).__name__} (failed at {part!r}: {e})") from None
    if not isinstance(obj, nnx.Variable):
        raise ValueError(
            f"layer: reference_weight_map entry {name!r} points at path {path}, which is a "
            f"{type(obj).__name__}, not an nnx.Variable")
    return obj


def export_reference_weights(layer) -> dict[str, np.ndarray]:
    """Export a layer's parameters as numpy arrays named and laid out as the reference.

    Args:
      layer: an ``nnx.Module`` with ``reference_weight_map()``.

    Returns:
      ``{reference name: np.ndarray}`` (in the parameter's dtype), loadable by the
      reference implementation after ``torch.from_numpy`` and by
      :func:`load_reference_weights`.
    """
    out = {}
    for name, (path, _to_jax, to_torch) in _weight_map(layer).items():
        var = _resolve(layer, path, name)
        out[name] = np.array(to_torch(np.asarray(var[...])))
    return out


def load_reference_weights(layer, arrays: Mapping[str, Any], *, strict: bool = True):
    """Load reference-named numpy arrays into a layer's parameters (in place).

    Everything is checked before anything is assigned: unknown names, missing names and
    every shape mismatch are collected and reported in one ``ValueError`` (name, shape
    got, shape expected), so a porting script needs one run to see every problem. Values
    are converted with the map's ``to_jax`` and cast to each parameter's dtype; the
    variables keep their metadata (partitioning names).

    Args:
      layer: an ``nnx.Module`` with ``reference_weight_map()`` (a model builds its map
        from its children, see :func:`prefixed_weight_map`).
      arrays: ``{reference name: array}`` (numpy arrays, or anything ``np.asarray``
        accepts, e.g. ``tensor.detach().cpu().numpy()``).
      strict: if ``True`` (default) unknown and missing names are errors; if ``False``
        unknown names are ignored and missing ones keep their current values (shape
        mismatches are always errors).

    Returns:
      The layer (modified in place).

    Raises:
      ValueError: listing every unknown name, every missing name and every shape mismatch.
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays: expected a dict of name -> numpy array, got {type(arrays).__name__}")
    wmap = _weight_map(layer)
    problems, updates = [], []
    unknown = sorted(set(arrays) - set(wmap))
    missing = sorted(set(wmap) - set(arrays))
    count = 0
    if strict and unknown:
        problems.append(f"unknown names (not in {type(layer).__name__}'s reference map): {unknown}")
        count += len(unknown)
    if strict and missing:
        problems.append(f"missing names: {missing}")
        count += len(missing)
    for name, (path, to_jax, to_torch) in wmap.items():
        if name not in arrays:
            continue
        var = _resolve(layer, path, name)
        current = np.asarray(var[...])
        expected = tuple(np.shape(to_torch(current)))
        got_arr = np.asarray(arrays[name])
        if tuple(got_arr.shape) != expected:
            problems.append(f"shape mismatch for {name!r}: got {tuple(got_arr.shape)}, expected {expected}")
            count += 1
            continue
        value = np.asarray(to_jax(got_arr))
        if tuple(value.shape) != tuple(current.shape):  # a broken map, not bad input
            problems.append(f"{name!r}: to_jax produced shape {tuple(value.shape)}, but the parameter "
                            f"at {path} has shape {tuple(current.shape)}")
            count += 1
            continue
        updates.append((var, value, current.dtype))
    if problems:
        raise ValueError(
            f"arrays: cannot load reference weights into {type(layer).__name__} "
            f"({count} problem(s)):\n  - " + "\n  - ".join(problems))
    for var, value, dt in updates:
        var[...] = jnp.asarray(value, dtype=dt)
    return layer
