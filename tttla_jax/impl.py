"""One implementation vocabulary for ops, rules and layers, and one resolver.

Every computation in the library — an op (``tt.linear_attention``, ``tt.delta_rule``),
a rule (``tt.rules.*``) or a layer (``tt.nn.*``) — can run in several *implementations*
that compute the same function (proved equal by :mod:`tttla_jax.testing`). They are named
with one word each, everywhere (``docs/implementations.md``):

=============== ===========================================================================
``recurrent``   ``lax.scan`` over tokens or chunks: the sequential "memorisation" view.
``chunked``     chunked matmuls: within a chunk in attention form, across chunks a scan over
                chunk states (Yang et al., 2024, "Gated Linear Attention", §3).
``associative`` ``lax.associative_scan`` over per-token or per-chunk state transforms.
``pallas``      the Pallas kernel (GPU via Triton lowering, TPU via Mosaic).
``dual``        TTT's mini-batch matmul form (Sun et al., 2024, "Learning to (Learn at Test
                Time)", §2.5 "dual form").
``primal``      TTT's per-row weights form (the same paper's "primal form").
``auto``        the first supported implementation in the computation's preference order.
=============== ===========================================================================

Each computation declares its implementations in preference order (:data:`Impl` values)
and, per call, why an implementation cannot run (``None`` if it can). :func:`resolve`
turns a request into one implementation: an explicit request runs or fails with its
reason; ``"auto"`` takes the first that can run, and if none can, the error lists every
candidate and why it failed.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal, Mapping, Optional, Sequence, Tuple, Union, get_args

import jax

#: The implementation names (one vocabulary for ops, rules and layers).
Impl = Literal["auto", "recurrent", "chunked", "associative", "pallas", "dual", "primal"]

#: Every value of :data:`Impl`, ``"auto"`` first.
IMPLS: Tuple[str, ...] = get_args(Impl)

#: Platforms on which compiled (non-interpret) Pallas kernels run.
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")

#: A reason an implementation cannot run: ``None`` (it can), a string, or a zero-argument
#: callable returning either (evaluated only when needed, e.g. a kernel shape probe).
Reason = Union[None, str, Callable[[], Optional[str]]]


def platform() -> str:
    """The platform computations run on (``jax.default_backend()``): ``"cpu"``, ``"gpu"``,
    ``"tpu"``, ... — the one place the library probes it."""
    return jax.default_backend()


def on_accelerator() -> bool:
    """Whether :func:`platform` runs compiled Pallas kernels (GPU or TPU)."""
    return platform() in ACCELERATORS


class ImplError(ValueError):
    """No requested implementation can run; the message names each one and why."""


def check_impl(name: str, impl, allowed: Sequence[str], *, where: str = "") -> str:
    """Validate an ``impl`` argument against the vocabulary and ``allowed``.

    Raises ``ValueError`` naming the argument, the value got and the implementations
    ``where`` (e.g. ``"DeltaNet"``) supports.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{name}: got {impl!r}, expected one of {tuple(allowed)} "
                         f"(the implementation vocabulary is {IMPLS}; see docs/implementations.md)")
    if impl not in allowed:
        who = f"{where} " if where else ""
        raise ValueError(f"{name}: {who}does not support impl={impl!r}; supported: {tuple(allowed)}")
    return impl


def _reason(r: Reason) -> Optional[str]:
    return r() if callable(r) else r


def resolve(impl: str, candidates: Union[Mapping[str, Reason], Iterable[Tuple[str, Reason]]], *,
            name: str = "impl", where: str = "") -> str:
    """Resolve an implementation request.

    Args:
      impl: the request: a value of :data:`Impl`.
      candidates: the computation's implementations in preference order, each with the
        reason it cannot run for this call (``None`` if it can; a callable is evaluated
        lazily). ``"auto"`` must not be a candidate.
      name: the argument name used in error messages.
      where: what is being resolved (e.g. ``"tt.linear_attention"``), for messages.

    Returns:
      The implementation to run (never ``"auto"``).

    Raises:
      ValueError: unknown name, or not one of the candidates.
      ImplError: the requested implementation cannot run (with its reason), or ``"auto"``
        found none that can (listing each candidate and its reason).
    """
    cands = list(candidates.items() if isinstance(candidates, Mapping) else candidates)
    names = [c for c, _ in cands]
    check_impl(name, impl, ("auto", *names), where=where)
    prefix = f"{where}: " if where else ""
    if impl != "auto":
        why = _reason(dict(cands)[impl])
        if why is not None:
            raise ImplError(f"{prefix}{name}={impl!r} cannot run this call: {why}")
        return impl
    failed = []
    for c, r in cands:
        why = _reason(r)
        if why is None:
            return c
        failed.append(f"{c}: {why}")
    raise ImplError(f"{prefix}{name}='auto' found no implementation that can run this call:\n  "
                    + "\n  ".join(failed))

