"""What every fast-weight update rule shares: the config base class, the
"not associative" error, and the registry that drives the equivalence tests.

A rule is a frozen dataclass holding the *static* configuration (chunk size, which
matrices update, loss, …). Arrays — inputs, learning rates, initial fast weights — are
arguments of its methods, so a rule is hashable and can be closed over under ``jit``.

* ``recurrent(...)`` — the pure ``lax.scan`` form, faithful to the reference.
* ``parallel(...)``  — where the math allows (SPEC §2, §7); otherwise raises
  :class:`NotAssociativeError` naming the component that breaks associativity.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict


class NotAssociativeError(ValueError):
    """The rule has no parallel (associative) form; the message names the component."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of rule configs. Subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    def recurrent(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.recurrent")

    def parallel(self, *args, **kwargs):
        raise NotAssociativeError(
            f"{type(self).__name__} has no parallel form: {self.breaks_associativity()}"
        )

    def breaks_associativity(self) -> str | None:
        """``None`` if a parallel form exists, else a sentence naming the breaking component."""
        return "no parallel form implemented for this rule"


# name -> zero-arg factory returning (rule, example-input builder); filled by rule modules.
REGISTRY: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"rule registry: duplicate name {name!r}")
        REGISTRY[name] = fn
        return fn

    return deco
