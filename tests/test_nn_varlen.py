"""Packed variable-length sequences in the NNX mixers (``cu_seqlens``) and ``ShortConv``.

Oracle: each sequence run alone through the same layer with batch size 1 (outputs
concatenated along T, caches stacked over sequences; an empty sequence leaves its cache
as it came in — a single call needs T >= 1). float64 at 1e-10.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn.layers import ShortConv
from tttla_jax.nn.mixers import DeltaNet, LinearAttention

F64 = jnp.float64
W, H = 8, 2
TOL = 1e-10
# float64 equivalence: every element within TOL (absolute), shapes and tree structure equal
assert_close = functools.partial(chex.assert_trees_all_close, rtol=0.0, atol=TOL)
LENS = (5, 0, 9, 1, 8, 3)   # an empty sequence, and ones shorter than the conv width (4)
LENS2 = (3, 3, 0, 3, 7, 10)  # another packing with the same N and T
CU = np.concatenate([[0], np.cumsum(LENS)]).astype(np.int32)
N, T = len(LENS), int(CU[-1])

CASES = {
    "la_elu": (LinearAttention, dict(feature_map="elu+1", chunk_size=4)),
    "la_decay": (LinearAttention, dict(feature_map="silu+l2", use_decay=True, chunk_size=4)),
    "delta_conv_gated": (DeltaNet, dict(use_gate=True, conv_size=4, chunk_size=3)),
    "delta_noconv": (DeltaNet, dict(use_short_conv=False, feature_map="l2", chunk_size=4)),
}

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def make(case, impl="chunked"):
    cls, kw = CASES[case]
    return cls(width=W, num_heads=H, impl=impl, dtype=F64, param_dtype=F64,
               rngs=nnx.Rngs(0), **kw)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape, (x.shape, y.shape)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F64) - jnp.asarray(y, F64)), initial=0.0))
               for x, y in zip(la, lb))


def random_cache(m, n, seed=2):
    c = m.init_cache(n)
    keys = iter(jax.random.split(jax.random.key(seed), len(c)))
    return {k: 0.5 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in c.items()}


def separate(m, x, cache, cu):
    """Each sequence alone (B = 1): ``(y [1, T, W], cache stacked over sequences)``."""
    cu = [int(c) for c in cu]
    ys, caches = [], []
    for n in range(len(cu) - 1):
        c_n = {k: v[n: n + 1] for k, v in cache.items()}
        if cu[n + 1] > cu[n]:
            y, c_n = m(x[:, cu[n]: cu[n + 1]], cache=c_n)
            ys.append(y)
        caches.append(c_n)
    return (jnp.concatenate(ys, axis=1),
            {k: jnp.concatenate([c[k] for c in caches], axis=0) for k in cache})


def objective(y, c):
    w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    return jnp.sum(y * w) + sum(jnp.sum(jnp.sin(v)) for v in c.values())


@functools.lru_cache(maxsize=None)
def run(case, impl, full=True):
    """Packed vs separate, from no cache and from a random per-sequence cache; with
    ``full`` also gradients w.r.t. x and that cache, and two decoding steps from the
    returned caches — one jit."""
    m = make(case, impl)
    x = jax.random.normal(jax.random.key(1), (1, T, W), F64)
    xd = jax.random.normal(jax.random.key(3), (N, 2, W), F64)
    c0 = random_cache(m, N)
    cu = jnp.asarray(CU)

    def packed(x, c):
        return m(x, cache=c, cu_seqlens=cu)

    def sep(x, c):
        return separate(m, x, c, CU)

    @jit
    def f(x, xd, c0):
        out = dict(p_nocache=m(x, cu_seqlens=cu), s_nocache=sep(x, m.init_cache(N)),
                   p=packed(x, c0), s=sep(x, c0))
        if not full:
            return out
        for name, fn in (("gp", packed), ("gs", sep)):
            out[name] = jax.grad(lambda x, c: objective(*fn(x, c)), argnums=(0, 1))(x, c0)
        # decoding continues all N sequences with batch size N from the packed cache...
        c, ys = out["p"][1], []
        for t in range(xd.shape[1]):
            y, c = m(xd[:, t: t + 1], cache=c)
            ys.append(y)
        out["dp"] = (jnp.concatenate(ys, axis=1), c)
        # ... and equals decoding each sequence alone from its own prefill
        dec = []
        for n in range(N):
            c = {k: v[n: n + 1] for k, v in out["s"][1].items()}
            ys = []
            for t in range(xd.shape[1]):
                y, c = m(xd[n: n + 1, t: t + 1], cache=c)
                ys.append(y)
            dec.append((jnp.concatenate(ys, axis=1), c))
        out["ds"] = (jnp.concatenate([d[0] for d in dec], axis=0),
                     {k: jnp.concatenate([d[1][k] for d in dec], axis=0) for k in c})
        return out

    return f(x, xd, c0)


#: the gated DeltaNet with its conv is the costliest case to compile; it runs @slow (the
#: packed DeltaNet with its default conv is also checked for every mixer in test_packed_mixers)
SLOW_CASES = ("delta_conv_gated",)
DEFAULT_CASES = [c if c not in SLOW_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("impl", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_packed_equals_separate_calls(case, impl):
    r = run(case, impl, full=impl == "chunked")
    for a, b in (("p_nocache", "s_nocache"), ("p", "s")):
        (yp, cp), (ys, cs) = r[a], r[b]
        assert yp.shape == (1, T, W) and yp.dtype == F64
        assert cp["state"].shape == (N, H, W // H, W // H)
        assert sorted(cp) == sorted(make(case).init_cache(1))
        assert_close(yp, ys)
        assert_close(cp, cs)
    # the input cache matters, and the empty sequence (index 1) passes its cache through
    assert max_diff(r["p"][0], r["p_nocache"][0]) > 1e-6
    c0 = random_cache(make(case), N)
    chex.assert_trees_all_equal({k: v[1] for k, v in r["p"][1].items()}, {k: v[1] for k, v in c0.items()})


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_packed_gradients_and_decoding(case):
    r = run(case, "chunked")
    assert_close(r["gp"], r["gs"])
    gx, gc = r["gp"]
    assert float(jnp.max(jnp.abs(gx))) > 0
    assert all(float(jnp.max(jnp.abs(v))) > 0 for v in gc.values())
    assert_close(r["dp"], r["ds"])


def test_one_sequence_equals_unpacked_call():
    m = make("delta_conv_gated")
    x = jax.random.normal(jax.random.key(5), (1, 7, W), F64)
    c = random_cache(m, 1)
    f = jit(lambda x, c: (m(x, cache=c, cu_seqlens=jnp.array([0, 7])), m(x, cache=c)))
    packed, plain = f(x, c)
    assert_close(packed, plain)


@pytest.mark.parametrize("case", ["la_decay", "delta_conv_gated"])
def test_traced_cu_seqlens_under_jit(case):
    """One compile for two packings with the same N and T; each equals its separate calls."""
    m = make(case)
    x = jax.random.normal(jax.random.key(1), (1, T, W), F64)
    c0 = random_cache(m, N)
    f = jit(lambda x, c, cu: m(x, cache=c, cu_seqlens=cu))
    for lens in (LENS, LENS2):
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        assert cu[-1] == T
        got = f(x, c0, jnp.asarray(cu))
        assert_close(got, jit(lambda x, c: separate(m, x, c, cu))(x, c0))
    assert f._cache_size() == 1


@pytest.mark.parametrize("lens,kernel", [((2, 0, 5, 1, 3), 4), ((2, 0, 5, 1, 3), 1), ((1, 1), 3)])
def test_short_conv_packed(lens, kernel):
    conv = ShortConv(6, kernel, param_dtype=F64, rngs=nnx.Rngs(0))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    n, t = len(lens), int(cu[-1])
    x = jax.random.normal(jax.random.key(1), (1, t, 6), F64)
    s0 = jax.random.normal(jax.random.key(2), (n, kernel - 1, 6), F64)
    for state in (None, s0):
        y, s = conv(x, state, cu_seqlens=jnp.asarray(cu))
        assert y.shape == (1, t, 6) and s.shape == (n, kernel - 1, 6)
        st = jnp.zeros_like(s0) if state is None else state
        for i in range(n):
            a, b = int(cu[i]), int(cu[i + 1])
            if b == a:
                chex.assert_trees_all_equal(s[i], st[i])
                continue
            yi, si = conv(x[:, a:b], st[i: i + 1])
            assert_close(y[:, a:b], yi)
            assert_close(s[i: i + 1], si)
    # a boundary matters: not the same as one unbroken stream
    if kernel > 1:
        assert max_diff(conv(x, cu_seqlens=jnp.asarray(cu))[0], conv(x)[0]) > 1e-6


def test_errors_name_the_argument():
    m = make("delta_conv_gated")
    cu = jnp.asarray(CU)
    with pytest.raises(ValueError, match=r"cu_seqlens: .*batch size B = 2"):
        m(jnp.zeros((2, T, W), F64), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cache\['state'\]: expected shape \[N, H, D, D\].*\(6, 2, 4, 4\), got \(2, 2, 4, 4\)"):
        m(jnp.zeros((1, T, W), F64), cache=m.init_cache(2), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cache\['state'\]: .*got \(1, 2, 4, 4\)"):
        make("la_elu")(jnp.zeros((1, T, W), F64), cache={"state": jnp.zeros((1, 2, 4, 4), F64)},
                       cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected to start at 0 and end at T"):
        make("la_elu")(jnp.zeros((1, T, W), F64), cu_seqlens=jnp.array([0, 3, 5]))
    conv = ShortConv(6, 4, param_dtype=F64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"state: expected shape \[N, kernel_size-1, F\].*\(2, 3, 6\), got \(1, 3, 6\)"):
        conv(jnp.zeros((1, 5, 6), F64), jnp.zeros((1, 3, 6), F64), cu_seqlens=jnp.array([0, 2, 5]))


@pytest.mark.parametrize("cls", [LinearAttention, DeltaNet])
def test_pallas_impl_with_cu_seqlens_runs_the_kernels(cls):
    """impl="pallas" on packed sequences runs the kernels (Pallas interpret mode on a CPU host)
    and equals the chunked form (float32); impl="auto" runs the chunked form on CPU."""
    m = cls(width=16, num_heads=1, impl="pallas", rngs=nnx.Rngs(0))
    ref = cls(width=16, num_heads=1, impl="chunked", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 16)), jnp.float32)
    cu = jnp.array([0, 2, 6])
    chex.assert_trees_all_close(m(x, cu_seqlens=cu), ref(x, cu_seqlens=cu), atol=1e-4, rtol=1e-4)
    auto = cls(width=16, num_heads=1, impl="auto", rngs=nnx.Rngs(0))
    y, c = jit(lambda x: auto(x, cu_seqlens=jnp.array([0, 2, 6])))(x)
    assert y.shape == (1, 6, 16) and c["state"].shape == (2, 1, 16, 16)
