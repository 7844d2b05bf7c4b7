"""The equivalence harness itself (``tt.testing``): what passes, what fails and what the
failure says. Tiny toy forms (a running sum; a toy linear-attention rule) keep it cheap.

The criterion under test, per leaf of each compared quantity:
``max|x - ref| <= rtol * max|ref| + atol`` with rtol/atol by dtype.
"""
import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.reduce import Reading
from tttla_jax.rules.base import Rule

F64 = jnp.float64


def _inputs(dtype=F64, scale=1.0):
    x = tt.testing.random_inputs({"x": (6, 3), "h0": (3,)}, seed=1, dtype=dtype)
    return {n: (a * scale).astype(dtype) for n, a in x.items()}


def running_sum(x, h0):
    """The baseline: h_t = h_{t-1} + x_t, output h_t; returns (outputs, final state)."""
    def step(h, xt):
        h = h + xt
        return h, h
    h, o = jax.lax.scan(step, h0, x)
    return o, h


def cumsum_form(x, h0):
    o = h0 + jnp.cumsum(x, axis=0)
    return o, o[-1]


def test_a_correct_pair_passes_with_every_quantity():
    rep = tt.testing.check_equivalence({"scan": running_sum, "cumsum": cumsum_form}, _inputs())
    rep.assert_ok()
    assert [e.quantity for e in rep.entries] == ["output", "state", "grad[x]", "grad[h0]"]
    assert all(e.tol == 1e-10 and e.atol == tt.testing.DEFAULT_ATOLS[jnp.dtype(F64)] for e in rep.entries)
    assert rep.max_error() < 1e-13 and rep.forms() == ("cumsum",)
    text = str(rep)
    assert "equivalence vs 'scan'" in text and "max|ref|" in text and "grad[h0]" in text


def test_wrongly_shaped_state_is_a_shape_mismatch_naming_both_shapes():
    def bad_state(x, h0):
        o, h = cumsum_form(x, h0)
        return o, h[:2]

    rep = tt.testing.check_equivalence({"scan": running_sum, "bad": bad_state}, _inputs())
    assert [(e.form, e.quantity) for e in rep.failures()] == [("bad", "state")]
    (e,) = rep.failures()
    assert e.mismatch == "shape mismatch: got (2,), baseline (3,)"
    # the gradients are still compared (through the outputs): not flagged because of the state
    grads = [e for e in rep.entries if e.quantity.startswith("grad[")]
    assert len(grads) == 2 and all(g.ok and "outputs only" in g.note for g in grads)
    with pytest.raises(AssertionError, match=r"bad state: shape mismatch: got \(2,\), baseline \(3,\)"):
        rep.assert_ok()


def test_state_structure_mismatch_names_both_structures():
    def tuple_state(x, h0):
        o, h = cumsum_form(x, h0)
        return o, (h, h)

    def no_state(x, h0):
        return cumsum_form(x, h0)[0], None

    rep = tt.testing.check_equivalence({"scan": running_sum, "pair": tuple_state, "none": no_state}, _inputs())
    msgs = {e.form: e.mismatch for e in rep.failures()}
    assert set(msgs) == {"pair", "none"} and all(e.quantity == "state" for e in rep.failures())
    assert msgs["pair"] == "structure mismatch: got (float64[3], float64[3]), baseline float64[3]"
    assert msgs["none"] == "structure mismatch: got None, baseline float64[3]"


def test_output_shape_mismatch_skips_its_gradients():
    def transposed(x, h0):
        o, h = cumsum_form(x, h0)
        return o.T, h

    rep = tt.testing.check_equivalence({"scan": running_sum, "t": transposed}, _inputs())
    assert [e.describe() for e in rep.failures()] == ["t output: shape mismatch: got (3, 6), baseline (6, 3)"]
    assert [e.quantity for e in rep.entries] == ["output", "state"]  # no incomparable gradients


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_small_magnitude_wrong_output_fails(dtype):
    """Values ~1e-3, one element off by 10 %: a relative check must catch it (an absolute
    1e-4 tolerance would not)."""
    x = _inputs(dtype, scale=1e-3)

    def off(x, h0):
        o, h = cumsum_form(x, h0)
        i = jnp.unravel_index(jnp.argmax(jnp.abs(o)), o.shape)
        return o.at[i].add(0.1 * jax.lax.stop_gradient(o[i])), h  # value off, gradient right

    rep = tt.testing.check_equivalence({"scan": running_sum, "off": off}, x)
    assert [(e.form, e.quantity) for e in rep.failures()] == [("off", "output")]
    (e,) = rep.failures()
    assert 1e-3 < e.scale < 1e-2 and 0.09 < e.max_abs_err / e.scale < 0.11
    with pytest.raises(AssertionError) as info:
        rep.assert_ok()
    msg = str(info.value)
    assert "forms disagree with 'scan'" in msg and "off output: max|err| = " in msg
    assert f"max|ref| {e.scale:.3e}" in msg and "relative error 1.0" in msg


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_tolerance_edge_either_side(dtype):
    x = _inputs(dtype)
    rtol = tt.testing.DEFAULT_TOLERANCES[jnp.dtype(dtype)]
    ref = np.asarray(cumsum_form(**x)[0], np.float64)
    scale = float(np.max(np.abs(ref)))

    def shifted(factor):
        def f(x, h0):
            o, h = cumsum_form(x, h0)
            return o.at[0, 0].add(jnp.asarray(factor * rtol * scale, o.dtype)), h
        return f

    forms = {"scan": running_sum, "inside": shifted(0.8), "outside": shifted(1.3)}
    rep = tt.testing.check_equivalence(forms, x, check_grads=False)
    assert [(e.form, e.quantity) for e in rep.failures()] == [("outside", "output")]


def test_absolute_floor_either_side():
    """An all-zero quantity: only the floor atol applies."""
    atol = tt.testing.DEFAULT_ATOLS[jnp.dtype(F64)]
    x = _inputs()

    def zeros(x, h0):
        return jnp.zeros_like(x), None

    def small(c):
        return lambda x, h0: (jnp.zeros_like(x).at[2, 1].set(c * atol), None)

    rep = tt.testing.check_equivalence({"zero": zeros, "inside": small(0.5), "outside": small(2.0)}, x,
                                       check_grads=False)
    assert [(e.form, e.quantity, e.scale) for e in rep.failures()] == [("outside", "output", 0.0)]


def test_relative_below_one():
    """A quantity of magnitude 1e-3 is held to rtol relative to 1e-3 (not to 1)."""
    x = _inputs(scale=1e-3)

    def tiny_err(x, h0):
        o, h = cumsum_form(x, h0)
        return o.at[1, 1].add(5e-11), h  # relative 1e-8: passes an absolute 1e-10, not 1e-10 relative

    rep = tt.testing.check_equivalence({"scan": running_sum, "f": tiny_err}, x, check_grads=False)
    assert [e.quantity for e in rep.failures()] == ["output"]


def test_gradient_zero_in_both_forms_passes_and_a_real_one_fails():
    """An input the outputs do not depend on: its gradient is 0 in the baseline; rounding
    noise in the other form passes (the floor), a real gradient does not."""
    x = dict(_inputs(), unused=jnp.ones((4,), F64))

    def base(x, h0, unused):
        return running_sum(x, h0)

    def noisy(c):
        def f(x, h0, unused):
            o, h = cumsum_form(x, h0)
            return o + c * jnp.sum(unused - jax.lax.stop_gradient(unused)), h  # value unchanged
        return f

    rep = tt.testing.check_equivalence({"base": base, "noise": noisy(1e-15), "real": noisy(1e-6)}, x)
    assert [(e.form, e.quantity) for e in rep.failures()] == [("real", "grad[unused]")]
    (e,) = rep.failures()
    assert e.scale == 0.0 and e.max_abs_err > 1e-7


def test_bfloat16_inputs_pick_the_bfloat16_tolerance():
    x = _inputs(jnp.bfloat16)

    def one_percent(x, h0):
        o, h = cumsum_form(x, h0)
        return (o.astype(jnp.float32) * 1.01).astype(o.dtype), h

    rep = tt.testing.check_equivalence({"scan": running_sum, "f": one_percent}, x)
    assert {(e.tol, e.atol) for e in rep.entries} == {(3e-2, 3e-4)}
    rep.assert_ok()
    x32 = _inputs(jnp.float32)
    rep32 = tt.testing.check_equivalence({"scan": running_sum, "f": one_percent}, x32, check_grads=False)
    assert {e.tol for e in rep32.entries} == {1e-4} and not rep32.ok


def test_explicit_tolerances_and_argument_errors():
    x = _inputs()
    rep = tt.testing.check_equivalence({"scan": running_sum, "c": cumsum_form}, x, tol=1e-6, atol=0.0)
    assert {(e.tol, e.atol) for e in rep.entries} == {(1e-6, 0.0)}
    with pytest.raises(ValueError, match="baseline: got 'nope'"):
        tt.testing.check_equivalence({"scan": running_sum}, x, baseline="nope")
    with pytest.raises(ValueError, match="grad_wrt: 'n' is not a floating input"):
        tt.testing.check_equivalence({"scan": running_sum}, dict(x, n=jnp.arange(3)), grad_wrt=["n"])
    with pytest.raises(ValueError, match="outputs_only: got"):
        tt.testing.check_equivalence({"scan": running_sum}, x, outputs_only=["nope"])


def test_assert_trees_close():
    a = {"w": jnp.ones((2, 3), F64), "b": jnp.full((3,), 1e-3, F64)}
    tt.testing.assert_trees_close(a, a)
    with pytest.raises(AssertionError, match=r"leaf \['b'\].*max\|ref\| 1.000e-03"):
        tt.testing.assert_trees_close({"w": a["w"], "b": a["b"] * 1.1}, a, name="params")
    with pytest.raises(AssertionError, match=r"params: shape mismatch at leaf \['w'\]: got \(3, 2\), baseline \(2, 3\)"):
        tt.testing.assert_trees_close({"w": a["w"].T, "b": a["b"]}, a, name="params")


def test_chex_variants_of_the_harness_agree():
    """jit=False runs the same comparison eagerly."""
    for jit in (True, False):
        tt.testing.check_equivalence({"scan": running_sum, "c": cumsum_form}, _inputs(), jit=jit).assert_ok()


# ---------------------------------------------------------------------------------------
# check_rule on a toy rule implementing the protocol


@dataclasses.dataclass(frozen=True)
class ToyRule(Rule):
    """Linear attention S_t = S_{t-1} + k_t v_tᵀ, o_t = q_t S_t on ``[1, T, 1, ·]`` inputs."""

    impls: ClassVar = ("chunked", "associative", "recurrent")
    broken: str = ""  # an implementation returning a wrong result (to test detection)

    def recurrent(self, q, k, v, S0):
        def step(S, t):
            qt, kt, vt = t
            S = S + jnp.outer(kt, vt)
            return S, qt @ S
        S, o = jax.lax.scan(step, S0[0, 0], (q[0, :, 0], k[0, :, 0], v[0, :, 0]))
        return o[None, :, None], S[None, None]

    def breaks_associativity(self):
        return None

    def parallel(self, q, k, v, S0, impl="auto"):
        impl = self.resolve_impl(impl)
        q2, k2, v2 = q[0, :, 0], k[0, :, 0], v[0, :, 0]
        if impl == "chunked":
            o = jnp.tril(q2 @ k2.T) @ v2 + q2 @ S0[0, 0]
        else:  # associative: prefix sums of the outer products
            S = S0[0, 0] + jnp.cumsum(k2[:, :, None] * v2[:, None, :], axis=0)
            o = jnp.einsum("tk,tkv->tv", q2, S)
        if impl == self.broken:
            o = o.at[-1].multiply(1.01)
        return o[None, :, None], (S0[0, 0] + k2.T @ v2)[None, None]

    def has_reading(self):
        return True

    def reading(self, q, k, v, S0):
        T = q.shape[1]
        return Reading(q=q, k=k, v=v, mask=jnp.tril(jnp.ones((T, T), q.dtype))[None, None],
                       state_coef=jnp.ones((1, 1, T), q.dtype), initial_state=S0)


def _toy_args():
    x = tt.testing.random_inputs({"q": (1, 5, 1, 3), "k": (1, 5, 1, 3), "v": (1, 5, 1, 2), "S0": (1, 1, 3, 2)},
                                 seed=3, dtype=F64)
    return tuple(x.values())


def test_check_rule_uses_the_protocol():
    rep = tt.testing.check_rule(ToyRule(), _toy_args())
    rep.assert_ok()
    assert rep.forms() == ("parallel[chunked]", "parallel[associative]", "reduction")
    assert {e.quantity for e in rep.entries if e.form == "reduction"} == \
        {"output", "grad[q]", "grad[k]", "grad[v]", "grad[S0]"}  # the reading: outputs only
    assert {e.family for e in rep.entries} == {"parallel", "reduction"}
    assert rep.max_error("parallel") == max(rep.max_error("parallel[chunked]"),
                                            rep.max_error("parallel[associative]"))


def test_check_rule_names_the_wrong_implementation():
    rep = tt.testing.check_rule(ToyRule(broken="associative"), _toy_args(), check_grads=False)
    assert [(e.form, e.quantity) for e in rep.failures()] == [("parallel[associative]", "output")]
    assert tt.testing.rule_forms(ToyRule()).keys() == {"recurrent", "parallel[chunked]",
                                                       "parallel[associative]", "reduction"}


def test_chex_asserts_are_used_for_structure():
    """The structure check is chex's: a NamedTuple vs a plain tuple of the same leaves differ."""
    from typing import NamedTuple

    class P(NamedTuple):
        a: jax.Array
        b: jax.Array

    a = jnp.ones(2, F64)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal_structs(P(a, a), (a, a))
    with pytest.raises(AssertionError, match="structure mismatch: got \\(float64\\[2\\], float64\\[2\\]\\), "
                                             "baseline P\\(a=float64\\[2\\], b=float64\\[2\\]\\)"):
        tt.testing.assert_trees_close((a, a), P(a, a))
