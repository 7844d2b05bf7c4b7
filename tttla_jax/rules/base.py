"""The rule protocol: what every fast-weight update rule provides, next to its math.

A rule is a frozen dataclass holding the *static* configuration (chunk size, which
matrices update, loss, …). Arrays — inputs, learning rates, initial fast weights — are
arguments of its methods, so a rule is hashable and can be closed over under ``jit``.
``inputs`` below means the positional inputs of :meth:`Rule.recurrent` (the same for
every method; the registry's builders produce them).

Protocol (docs/implementations.md, docs/ttt_as_linear_attention.md):

* ``init_state(...)`` — the rule's fast-weight state (family-specific arguments).
* ``recurrent(*inputs)`` — the pure ``lax.scan`` form, faithful to the reference;
  returns ``(outputs, final_state)``.
* ``impls`` — the rule's implementations (values of :data:`tttla_jax.impl.Impl`) in
  ``"auto"`` preference order; :meth:`parallel_impls` are those other than the sequential
  ones.
* ``parallel(*inputs, impl="auto")`` — where the math allows (docs/ttt_as_linear_attention.md,
  docs/ladder.md); otherwise raises :class:`NotAssociativeError` naming the component
  that breaks associativity (:meth:`breaks_associativity`).
* ``__call__(*inputs, impl="auto")`` — one entry point resolving ``impl`` over
  :attr:`impls` with :func:`tttla_jax.impl.resolve`.
* ``reading(*inputs)`` — the rule's linear-attention reading
  (:class:`tttla_jax.reduce.Reading`, Theorems 5.1–5.3); :meth:`has_reading` says whether
  this configuration has one (``tt.reduce(rule, *inputs)`` dispatches here).
* ``linear_attention_reason()`` — ``None`` when the rule *is* plain (decayed) linear
  attention, so layers can route it to ``tt.linear_attention`` (and its Pallas kernel)
  through :meth:`linear_attention_inputs`; else the sentence saying why not.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Dict, Optional, Tuple

from tttla_jax import impl as _impl

#: Implementations that are sequential (not parallel forms of the rule).
SEQUENTIAL_IMPLS = ("recurrent", "dual", "primal")


class NotAssociativeError(_impl.ImplError):
    """The rule has no parallel (associative) form; the message names the component.

    An :class:`tttla_jax.impl.ImplError` (hence a ``ValueError``): no parallel
    implementation can run this configuration."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of rule configs. Subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    #: implementations in "auto" preference order (parallel forms first where they exist)
    impls: ClassVar[Tuple[str, ...]] = ("recurrent",)

    def recurrent(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.recurrent")

    def parallel(self, *args, impl: str = "auto", **kwargs):
        raise NotAssociativeError(
            f"{type(self).__name__} has no parallel form: {self.breaks_associativity()}"
        )

    def breaks_associativity(self) -> Optional[str]:
        """``None`` if a parallel form exists, else a sentence naming the breaking component."""
        return "no parallel form implemented for this rule"

    def parallel_impls(self) -> Tuple[str, ...]:
        """The parallel implementations this configuration runs (those of :meth:`impl_reasons`
        without a reason; empty if none)."""
        return tuple(i for i, why in self.impl_reasons().items() if why is None and i not in SEQUENTIAL_IMPLS)

    def impl_reasons(self) -> Dict[str, Optional[str]]:
        """Each implementation of :attr:`impls` with why it cannot run (``None``: it can)."""
        why = self.breaks_associativity()
        return {i: (why if i not in SEQUENTIAL_IMPLS else None) for i in self.impls}

    def resolve_impl(self, impl: str = "auto") -> str:
        """The implementation a call with ``impl`` runs (:func:`tttla_jax.impl.resolve`)."""
        return _impl.resolve(impl, self.impl_reasons(), where=type(self).__name__)

    def resolve_parallel_impl(self, impl: str = "auto") -> str:
        """The parallel implementation :meth:`parallel` runs for ``impl`` (resolved over the
        parallel entries of :meth:`impl_reasons`, each failing with its reason)."""
        why = self.breaks_associativity()
        if why is not None:
            raise NotAssociativeError(f"{type(self).__name__} has no parallel form: {why}")
        reasons = {i: r for i, r in self.impl_reasons().items() if i not in SEQUENTIAL_IMPLS}
        return _impl.resolve(impl, reasons, where=f"{type(self).__name__}.parallel")

    def __call__(self, *args, impl: str = "auto", **kwargs):
        """Run the rule with ``impl`` resolved over :attr:`impls`."""
        chosen = self.resolve_impl(impl)
        if chosen in SEQUENTIAL_IMPLS:
            return self.recurrent(*args, **kwargs)
        return self.parallel(*args, impl=chosen, **kwargs)

    def has_reading(self) -> bool:
        """Whether :meth:`reading` supports this configuration."""
        return False

    def reading(self, *args, **kwargs):
        """The linear-attention reading (:class:`tttla_jax.reduce.Reading`) on these inputs."""
        raise NotImplementedError(f"{type(self).__name__} has no linear-attention reading")

    def linear_attention_reason(self) -> Optional[str]:
        """``None`` if the rule is plain (decayed) linear attention, else why not."""
        return f"{type(self).__name__} is not plain linear attention"

    def linear_attention_inputs(self, *args, **kwargs) -> dict:  # pragma: no cover - abstract
        """Keyword arguments of ``tt.linear_attention`` computing this rule (only when
        :meth:`linear_attention_reason` is ``None``)."""
        raise NotImplementedError(self.linear_attention_reason())


# name -> zero-arg factory returning (rule, example-input builder); filled by rule modules.
REGISTRY: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"rule registry: duplicate name {name!r}")
        REGISTRY[name] = fn
        return fn

    return deco
