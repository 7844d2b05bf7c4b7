"""Per-channel log-decays ``log_decay [B, T, H, K]`` (GLA; Kimi Delta Attention) in every XLA form.

``tt.linear_attention``: ``S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t``; ``tt.delta_rule``:
``S ← diag(exp(g_t)) S_{t-1}`` then the delta step. Every form (recurrent, chunked,
associative for linear attention; packed ``cu_seqlens`` sequences) is compared with the
float64 loops of :mod:`tttla_jax.reference` — outputs, final states and the gradients w.r.t.
q, k, v, β, the initial state and the log-decay — on log-decays with a whole ``-inf``
channel, a ``-1e30`` token (every channel), a ``-1e6`` entry and ordinary decays in
``[-1, 0]`` elsewhere (docs/linear_attention.md, "Per-channel gates").

The chunked forms put the decay inside the ``q·k`` contraction
(:func:`tttla_jax.ops.chunk.decayed_gram`, sub-chunks around reference points): the default
suite runs chunks of 8 with sub-chunks of 4 (``chunk.SUB_CHUNK`` patched) so the factorised
off-diagonal blocks, the exact diagonal blocks and a padded last sub-chunk are all exercised
at T = 21; the @slow tests run the shipped sub-chunk size (16) with chunks of 32 and 64.

Cost: the default selection (11 tests) measured 305 s wall / 38 s CPU under load 33 on the
2 shared cores before the dot-loss rule and the LinearAttention layer moved to @slow (about
30 s CPU now); the @slow rest (25 tests) passes in ~22 min wall under that load.

Tolerances (documented): float64 1e-10 absolute (O(1) inputs); float32 inputs 2e-4 relative
to the reference's max magnitude (the reference runs in float64 on the same float32 inputs).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.impl import ImplError
from tttla_jax.ops import chunk
from tttla_jax.reference.delta import delta_rule_loop
from tttla_jax.reference.linear import linear_attention_loop

B, T, H, K, V, C = 1, 21, 2, 5, 3, 8
CU = (0, 6, 6, 21)  # packed: three sequences, one empty; the cuts fall inside the last
NAMES = ("o", "S", "dq", "dk", "dv", "dbeta", "dlog_decay", "dS0")


@pytest.fixture(autouse=True)
def small_sub_chunks(monkeypatch):
    """Sub-chunks of 4 tokens in chunks of 8: both kinds of blocks of decayed_gram."""
    monkeypatch.setattr(chunk, "SUB_CHUNK", 4)


def make_inputs(T=T, dtype=jnp.float64, seed=0, n_states=None):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    beta = rng.uniform(0.05, 0.95, size=(B, T, H))
    g = -rng.uniform(0.0, 1.0, size=(B, T, H, K))
    g[:, :, 0, 1] = -np.inf          # a channel that forgets at every token
    g[:, 13, 1, :] = -1e30           # a token that resets every channel of head 1
    g[:, 9, 1, 3] = -1e6             # one entry
    g[:, 17, 0, 0] = -np.inf
    S0 = rng.normal(size=(n_states or B, H, K, V))
    W = rng.normal(size=(B, T, H, V))  # loss weights on o
    W2 = rng.normal(size=(n_states or B, H, K, V))  # ... and on S
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, beta, g, S0, W, W2))


def value_and_grads(fn, args, W, W2):
    """Outputs, final state and the gradients of ``<o, W> + <S, W2>`` w.r.t. q, k, v, β, g, S0."""
    def loss(*a):
        o, S = fn(*a)
        return jnp.sum(o.astype(jnp.float64) * W) + jnp.sum(S.astype(jnp.float64) * W2)

    @jax.jit
    def both(*a):
        return fn(*a), jax.grad(loss, argnums=tuple(range(6)))(*a)

    return both(*args)


def _ref(op, masking, chunk_size, packed):
    def one(q, k, v, beta, g, S0):
        if op == "la":
            return linear_attention_loop(q, k, v, log_decay=g, initial_state=S0, masking=masking,
                                         chunk_size=chunk_size, scale=K ** -0.5)
        return delta_rule_loop(q, k, v, beta, log_decay=g, initial_state=S0, scale=K ** -0.5)

    def fn(q, k, v, beta, g, S0):
        if not packed:
            return one(q, k, v, beta, g, S0)
        outs, states = [], []
        for n in range(len(CU) - 1):
            sl = slice(CU[n], CU[n + 1])
            if CU[n + 1] == CU[n]:
                states.append(S0[n:n + 1])
                continue
            o, S = one(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], S0[n:n + 1])
            outs.append(o)
            states.append(S)
        return jnp.concatenate(outs, 1), jnp.concatenate(states, 0)
    return fn


def _op(op, impl, masking, chunk_size, packed):
    kw = dict(chunk_size=chunk_size, impl=impl, output_final_state=True)
    if packed:
        kw["cu_seqlens"] = jnp.asarray(CU, jnp.int32)

    def fn(q, k, v, beta, g, S0):
        if op == "la":
            return tt.linear_attention(q, k, v, log_decay=g, initial_state=S0, masking=masking, **kw)
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=S0, **kw)
    return fn


@functools.lru_cache(maxsize=None)
def reference(op, masking="causal", packed=False, T=T, chunk_size=C):
    q, k, v, beta, g, S0, W, W2 = make_inputs(T, n_states=len(CU) - 1 if packed else None)
    return value_and_grads(_ref(op, masking, chunk_size, packed), (q, k, v, beta, g, S0), W, W2)


def run(op, impl, masking="causal", packed=False, T=T, chunk_size=C, dtype=jnp.float64):
    q, k, v, beta, g, S0, W, W2 = make_inputs(T, dtype, n_states=len(CU) - 1 if packed else None)
    return value_and_grads(_op(op, impl, masking, chunk_size, packed), (q, k, v, beta, g, S0),
                           W.astype(jnp.float64), W2.astype(jnp.float64))


def assert_matches(got, ref, what, *, op, atol=None, rel=None):
    (o, S), grads = got
    (o_r, S_r), grads_r = ref
    for name, a, b in zip(NAMES, (o, S) + tuple(grads), (o_r, S_r) + tuple(grads_r)):
        if name == "dbeta" and op == "la":
            continue  # linear attention has no β
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what}: {name} shape {a.shape} != {b.shape}"
        assert np.all(np.isfinite(b)), f"{what}: the float64 loop's {name} is not finite"
        assert np.all(np.isfinite(a)), f"{what}: {name} has non-finite entries at {np.argwhere(~np.isfinite(a))[:5]}"
        tol = atol if atol is not None else rel * max(1.0, float(np.max(np.abs(b))))
        err = float(np.max(np.abs(a - b)))
        assert err <= tol, f"{what}: {name} max abs error {err:.3g} > {tol:.3g}"


def cut_mask(T=T):
    g = np.asarray(make_inputs(T)[4])
    return g <= -chunk.cut_threshold(jnp.float64)


# --------------------------------------------------------------------------- the toolkit


@pytest.mark.parametrize("Cc,sub", [(7, 3)] + [pytest.param(*a, marks=pytest.mark.slow) for a in [(8, 4), (13, 16)]])
def test_decayed_gram_matches_brute_force(Cc, sub):
    """decayed_gram ≡ Σ_κ x_iκ y_jκ Π_{j<r≤i} exp(g_rκ) computed token by token in NumPy
    (cuts included; C not a multiple of the sub-chunk; one sub-chunk only)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 3, Cc, 4)), rng.normal(size=(2, 3, Cc, 4))
    g = -rng.uniform(0, 3, size=(2, 3, Cc, 4))
    g[0, 1, 2, :] = -np.inf
    g[1, 0, Cc // 2, 1] = -1e30
    g[1, 2, :, 3] = -np.inf
    c, s, gamma, lam, Gam = chunk.channel_decays(jnp.asarray(g))
    for strict in (False, True):
        G = np.asarray(chunk.decayed_gram(jnp.asarray(x), jnp.asarray(y), c, s, strict=strict, sub=sub))
        ref = np.zeros(G.shape)
        for i in range(Cc):
            for j in range(i if strict else i + 1):
                e = np.exp(np.sum(g[..., j + 1:i + 1, :], axis=-2))  # -inf sums: exp = 0
                ref[..., i, j] = np.sum(x[..., i, :] * y[..., j, :] * e, axis=-1)
        np.testing.assert_allclose(G, ref, atol=1e-12, rtol=0)
    # γ, λ, Γ per channel
    b = np.cumsum(g, axis=-2)
    np.testing.assert_allclose(np.asarray(gamma), np.exp(b), atol=1e-14)
    lam_ref = np.stack([np.exp(np.sum(g[..., j + 1:, :], axis=-2)) for j in range(Cc)], axis=-2)
    np.testing.assert_allclose(np.asarray(lam), lam_ref, atol=1e-14)
    np.testing.assert_allclose(np.asarray(Gam), np.exp(b[..., -1, :]), atol=1e-14)


# --------------------------------------------------------------------------- float64, every form


@pytest.mark.parametrize("impl,masking", [("chunked", "causal"), ("recurrent", "causal"), ("associative", "causal")] + [
    pytest.param(i, m, marks=pytest.mark.slow)
    for i in ("chunked", "recurrent", "associative") for m in ("chunk", "none")])
def test_linear_attention_float64(impl, masking):
    got = run("la", impl, masking)
    assert_matches(got, reference("la", masking), f"linear_attention {impl} {masking}", op="la", atol=1e-10)
    assert np.all(np.asarray(got[1][4])[cut_mask()] == 0.0)  # d/dg exp(g) = 0 at a cut


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_delta_rule_float64(impl):
    got = run("dr", impl)
    assert_matches(got, reference("dr"), f"delta_rule {impl}", op="dr", atol=1e-10)
    assert np.all(np.asarray(got[1][4])[cut_mask()] == 0.0)


@pytest.mark.parametrize("op,impl,masking", [("la", "chunked", "causal")] + [
    pytest.param(op, impl, m, marks=pytest.mark.slow)
    for op, impl, m in [("dr", "chunked", "causal"), ("la", "recurrent", "causal"), ("la", "associative", "causal"), ("la", "chunked", "chunk"),
                        ("la", "chunked", "none"), ("la", "associative", "chunk"), ("la", "recurrent", "none"),
                        ("dr", "recurrent", "causal")]])
def test_packed_float64(op, impl, masking):
    got = run(op, impl, masking, packed=True)
    assert_matches(got, reference(op, masking, packed=True), f"packed {op} {impl} {masking}", op=op, atol=1e-10)
    assert np.all(np.asarray(got[1][4])[cut_mask()] == 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("op,Tl,Cl", [("la", 45, 32), ("dr", 45, 32), ("la", 70, 64), ("dr", 70, 64)])
def test_shipped_sub_chunks_float64(op, Tl, Cl, monkeypatch):
    """The shipped sub-chunk size (16) in chunks of 32 and 64 (2 and 4 sub-chunks, last chunk partial)."""
    monkeypatch.setattr(chunk, "SUB_CHUNK", 16)
    got = run(op, "chunked", T=Tl, chunk_size=Cl)
    assert_matches(got, reference(op, T=Tl, chunk_size=Cl), f"{op} chunked T={Tl} C={Cl}", op=op, atol=1e-10)


@pytest.mark.slow
def test_per_head_gate_as_channels_is_the_per_head_op():
    """A per-head log-decay repeated over K channels gives the per-head op's results (chunked,
    both ops; the per-channel path is a different code path)."""
    q, k, v, beta, g, S0, W, W2 = make_inputs()
    gh = jnp.clip(g[..., 0], -1.0, 0.0)
    gc = jnp.broadcast_to(gh[..., None], g.shape)
    for op in ("la", "dr"):
        fn = _op(op, "chunked", "causal", C, False)
        a = value_and_grads(fn, (q, k, v, beta, gc, S0), W, W2)
        b = value_and_grads(fn, (q, k, v, beta, gh, S0), W, W2)
        (oa, Sa), ga = a
        (ob, Sb), gb = b
        np.testing.assert_allclose(oa, ob, atol=1e-12)
        np.testing.assert_allclose(Sa, Sb, atol=1e-12)
        for x, y in zip(ga[:4] + ga[5:], gb[:4] + gb[5:]):
            np.testing.assert_allclose(x, y, atol=1e-12)
        np.testing.assert_allclose(jnp.sum(ga[4], -1), gb[4], atol=1e-12)  # dg_head = Σ_κ dg_κ


# --------------------------------------------------------------------------- float32


@pytest.mark.slow
@pytest.mark.parametrize("op", ["la", "dr"])
def test_float32_chunked(op):
    got = run(op, "chunked", dtype=jnp.float32)
    assert got[0][0].dtype == jnp.float32 and got[0][1].dtype == jnp.float32
    assert_matches(got, reference(op), f"{op} chunked float32", op=op, rel=2e-4)


# --------------------------------------------------------------------------- errors, impl reasons


def test_bad_shape_names_log_decay():
    q, k, v, beta, g, S0, W, W2 = make_inputs()
    bad = jnp.zeros((B, T, H, K + 1))
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[B, T, H\] = \(1, 21, 2\), got \(1, 21, 2, 6\); or, one value "
                       r"per key channel, \[B, T, H, K\] = \(1, 21, 2, 5\)"):
        tt.linear_attention(q, k, v, log_decay=bad)
    with pytest.raises(ValueError, match=r"log_decay: .*per key channel"):
        tt.delta_rule(q, k, v, beta, log_decay=bad)
    with pytest.raises(ValueError, match="beta: expected shape"):  # β stays per head
        tt.delta_rule(q, k, v, g, log_decay=g)


def test_pallas_names_per_channel_gates():
    kernels = pytest.importorskip("tttla_jax.kernels")
    q, k, v, beta, g, S0, W, W2 = make_inputs()

    la = tt.ops.linear_attention_impl_reasons(q, k, v, log_decay=g, impl="pallas")
    dr = tt.ops.delta_rule_impl_reasons(q, k, v, log_decay=g, impl="pallas")
    for op, reasons in (("linear_attention", la), ("delta_rule", dr)):
        assert reasons["chunked"] is None
        if op not in getattr(kernels, "PER_CHANNEL_GATES", ()):
            assert "per-channel log_decay" in reasons["pallas"]
            with pytest.raises(ImplError, match="per-channel log_decay"):
                if op == "linear_attention":
                    tt.linear_attention(q, k, v, log_decay=g, impl="pallas")
                else:
                    tt.delta_rule(q, k, v, beta, log_decay=g, impl="pallas")
    # a per-head log-decay is not refused for that reason
    assert "per-channel" not in (tt.ops.linear_attention_impl_reasons(q, k, v, log_decay=g[..., 0],
                                                                      impl="pallas")["pallas"] or "")


# --------------------------------------------------------------------------- rules and layers


@pytest.mark.parametrize("loss", [pytest.param("dot", marks=pytest.mark.slow), "mse"])
def test_rule_channel_gate(loss):
    """LinearFastWeightRule(gate="channel"): the lax.scan rule ≡ the float64 loop, and its
    parallel forms ≡ the scan (tt.testing.check_rule); no reading."""
    q, k, v, beta, g, S0, W, W2 = make_inputs()
    rule = tt.rules.LinearFastWeightRule(loss=loss, gated=True, gate="channel", chunk_size=C)
    lr = beta if loss == "mse" else None
    o, S = rule.recurrent(q, k, v, lr, g, S0)
    (o_r, S_r), _ = reference("la" if loss == "dot" else "dr")
    np.testing.assert_allclose(o, o_r, atol=1e-10)
    np.testing.assert_allclose(S, S_r, atol=1e-10)
    assert not rule.has_reading()
    with pytest.raises(NotImplementedError, match="per-channel"):
        rule.reading(q, k, v, lr, g, S0)
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[B, T, H, K\]"):
        rule.recurrent(q, k, v, lr, g[..., 0], S0)
    if loss == "mse":
        tt.testing.check_rule(rule, (q, k, v, lr, g, S0)).assert_ok()


@pytest.mark.parametrize("name", [pytest.param("LinearAttention", marks=pytest.mark.slow), "DeltaNet"])
def test_layer_channel_gate_decode_equals_forward(name):
    """gate_kind="channel": the gate is [B, T, H, D]; a prefill of 5 tokens then decoding one
    token at a time gives the full forward's outputs and cache (float64)."""
    from flax import nnx

    kw = dict(width=8, num_heads=2, chunk_size=4, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    if name == "LinearAttention":
        layer = tt.nn.LinearAttention(use_decay=True, gate_kind="channel", **kw)
    else:
        layer = tt.nn.DeltaNet(use_gate=True, gate_kind="channel", **kw)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8)))
    assert layer.gate(x).shape == (2, 8, 2, 4)
    y, cache = layer(x)
    ys, c = [], layer.init_cache(2)
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 8)):
        yt, c = layer(x[:, a:b], cache=c)
        ys.append(yt)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=1e-10)
    for key in cache:
        np.testing.assert_allclose(c[key], cache[key], atol=1e-10)
    with pytest.raises(ValueError, match="gate_kind: got 'key', expected one of"):
        type(layer)(use_decay=True, gate_kind="key", **kw) if name == "LinearAttention" else \
            type(layer)(use_gate=True, gate_kind="key", **kw)
