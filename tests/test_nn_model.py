"""LanguageModel, LMConfig and decoding (tttla_jax.nn.model, tttla_jax.nn.decode).

float64 at 1e-10: recurrent vs chunked logits and parameter gradients (the chunked
model also rematerialises its blocks), prefill + token-by-token decoding == full forward
(prompt length 5, not a multiple of the chunk sizes 4 / 3), greedy ``generate`` ==
step-by-step argmax decoding.
"""
import functools

import chex
import jax
import numpy as np
import optax
import jax.numpy as jnp
import pytest
from flax import nnx

from tttla_jax.nn.decode import decode_step, generate, prefill
from tttla_jax.nn.mixers import DeltaNet, LinearAttention, SlidingWindowAttention
from tttla_jax.nn.model import LanguageModel, LMConfig, count_params

F64 = jnp.float64
TOL = 1e-10
# float64 equivalence: every element within TOL (absolute), shapes and tree structure equal
assert_close = functools.partial(chex.assert_trees_all_close, rtol=0.0, atol=TOL)
B, T, V = 2, 7, 13
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)

HYBRID = dict(
    vocab_size=V, width=8, num_layers=3, num_heads=2, mlp_hidden=12,
    mixers=("linear_attention", "delta_net", "swa"),
    mixer_options={"linear_attention": {"use_decay": True, "chunk_size": 4},
                   "delta_net": {"use_gate": True, "chunk_size": 3},
                   "swa": {"window": 3}},
    dtype=F64, param_dtype=F64)


def max_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, F64) - jnp.asarray(y, F64))))
               for x, y in zip(la, lb))


def tokens(t=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, t), 0, V)


@functools.lru_cache(maxsize=None)
def run(impl, remat):
    model = LanguageModel(LMConfig(**HYBRID, impl=impl, remat=remat), rngs=nnx.Rngs(0))
    gd, params = nnx.split(model)
    toks = tokens()

    @jit
    def f(params):
        m = nnx.merge(gd, params)

        def loss(params):
            logits, _ = nnx.merge(gd, params)(toks)
            return jnp.sum(logits * jnp.cos(jnp.arange(logits.size).reshape(logits.shape)))

        logits, cache = m(toks)
        grads = jax.grad(loss)(params)
        pl, c = prefill(m, toks[:, :5])
        steps = [pl]
        for t in range(5, T):
            lt, c = decode_step(m, toks[:, t], c)
            steps.append(lt[:, None])
        return logits, cache, grads, jnp.concatenate(steps, axis=1), c

    return f(params)


@pytest.mark.slow  # 21 s; every mixer's forms are compared in its own test file
def test_recurrent_and_chunked_lm_agree_with_remat():
    l0, c0, g0, _, _ = run("recurrent", False)
    l1, c1, g1, _, _ = run("chunked", True)
    assert l0.shape == (B, T, V) and l0.dtype == F64
    assert_close(l0, l1)
    assert_close(c0, c1)
    assert_close(g0, g1)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g0))


@pytest.mark.parametrize("impl,remat", [pytest.param("recurrent", False, marks=pytest.mark.slow), ("chunked", True)])
def test_prefill_then_decode_equals_full_forward(impl, remat):
    logits, cache, _, stepped, c = run(impl, remat)
    assert_close(stepped, logits)
    assert_close(c, cache)
    assert jnp.array_equal(c["pos"], jnp.full((B,), T))


def test_generate_greedy_is_argmax_decoding_and_deterministic():
    cfg = LMConfig(vocab_size=V, width=8, num_layers=2, num_heads=2, mlp_hidden=8,
                   mixers=("delta_net", "swa"), impl="chunked",
                   mixer_options={"swa": {"window": 3}, "delta_net": {"chunk_size": 4}},
                   dtype=F64, param_dtype=F64, embed_init_std=1.0)
    model = LanguageModel(cfg, rngs=nnx.Rngs(1))
    prompt, n = tokens(5, seed=3), 6
    out = generate(model, prompt, n, rng=jax.random.key(0))
    assert out.shape == (B, n) and out.dtype == jnp.int32
    assert jnp.array_equal(out, generate(model, prompt, n, rng=jax.random.key(9)))  # greedy ignores rng

    gd, params = nnx.split(model)
    pre = jit(lambda p, t: prefill(nnx.merge(gd, p), t))
    step = jit(lambda p, t, c: decode_step(nnx.merge(gd, p), t, c))
    logits, c = pre(params, prompt)
    tok = jnp.argmax(logits[:, -1], -1)
    expected = [tok]
    for _ in range(n - 1):
        logits, c = step(params, tok, c)
        tok = jnp.argmax(logits, -1)
        expected.append(tok)
    expected = jnp.stack(expected, axis=1)
    assert jnp.array_equal(out, expected)
    # with a full-vocabulary forward: feeding prompt + generated tokens, the argmax of the
    # logits at every generated position reproduces the next generated token
    full, _ = jit(lambda p, t: nnx.merge(gd, p)(t))(params, jnp.concatenate([prompt, out], axis=1))
    assert jnp.array_equal(jnp.argmax(full[:, 4:-1], -1), out)


def test_generate_sampling_is_reproducible_and_top_k_1_is_greedy():
    cfg = LMConfig(vocab_size=V, width=8, num_layers=1, num_heads=2, mlp_hidden=8,
                   mixers="linear_attention", embed_init_std=1.0)
    model = LanguageModel(cfg, rngs=nnx.Rngs(2))
    prompt = tokens(3, seed=4)
    greedy = generate(model, prompt, 5, rng=jax.random.key(0))
    s1 = generate(model, prompt, 5, rng=jax.random.key(1), temperature=1.0, top_k=1)
    assert jnp.array_equal(s1, greedy)
    a = generate(model, prompt, 5, rng=jax.random.key(1), temperature=2.0)
    b = generate(model, prompt, 5, rng=jax.random.key(1), temperature=2.0)
    c = generate(model, prompt, 5, rng=jax.random.key(2), temperature=2.0)
    assert jnp.array_equal(a, b)
    assert bool(jnp.all((a >= 0) & (a < V)))
    assert not (jnp.array_equal(a, c) and jnp.array_equal(a, greedy))


def test_trains_with_nnx_optimizer():
    """The model plugs into nnx.Optimizer(model, tx, wrt=nnx.Param): a few Adam steps on a
    fixed batch lower the next-token loss."""
    cfg = LMConfig(vocab_size=V, width=8, num_layers=1, num_heads=2, mlp_hidden=8,
                   mixers="delta_net", mixer_options={"delta_net": {"chunk_size": 4}})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    toks = tokens(8, seed=5)

    def loss_fn(model):
        logits, _ = model(toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(train_step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0] - 1e-3, losses


def test_parameter_count_by_hand():
    W, H, L, F, Vb = 8, 2, 3, 12, 13
    D, HD = W // H, W
    cfg = LMConfig(**{**HYBRID, "dtype": None, "param_dtype": jnp.float32})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    la = 4 * W * HD + D + (W * H + 2 * H)                       # use_decay
    dn = 4 * W * HD + W * H + D + 3 * 4 * HD + (W * H + 2 * H)  # conv_size 4, use_gate
    swa = 4 * W * HD
    per_block = 2 * W + 3 * W * F                                # two norms + SwiGLU
    expected = Vb * W + L * per_block + la + dn + swa + W        # + final norm; head tied
    assert count_params(model) == expected
    # the mixers inside match their standalone counts
    standalone = [LinearAttention(width=W, num_heads=H, use_decay=True, rngs=nnx.Rngs(0)),
                  DeltaNet(width=W, num_heads=H, use_gate=True, rngs=nnx.Rngs(0)),
                  SlidingWindowAttention(width=W, num_heads=H, rngs=nnx.Rngs(0))]
    assert [count_params(m) for m in standalone] == [la, dn, swa]


def test_hybrid_is_one_config_line():
    cfg = LMConfig(vocab_size=V, width=8, num_layers=4, num_heads=2,
                   mixers=("delta_net", "swa") * 2)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["DeltaNet", "SlidingWindowAttention"] * 2
    assert LMConfig(vocab_size=V, width=8, num_layers=3, num_heads=2, mixers="swa").mixers == ("swa",) * 3
    assert cfg.options_for("swa") == {}
    assert hash(cfg) == hash(LMConfig(vocab_size=V, width=8, num_layers=4, num_heads=2,
                                      mixers=["delta_net", "swa"] * 2))


BASE = dict(vocab_size=V, width=8, num_layers=2, num_heads=2)


@pytest.mark.parametrize("over,match", [
    (dict(num_heads=3), r"num_heads: must divide width"),
    (dict(head_dim=3, mixers="swa"), r"mixer 'swa': head_dim: RoPE needs an even head dim, got 3"),
    (dict(mixers="mamba"), r"mixers\[0\]: unknown mixer 'mamba', expected one of \('linear_attention', 'delta_net', 'swa'"),
    (dict(mixers=("swa",)), r"mixers: expected a mixer name or a sequence of num_layers=2 names"),
    (dict(mixer_options={"swa": {"windw": 4}}), r"mixer_options\['swa'\]: unknown options \['windw'\], expected a subset of"),
    (dict(mixer_options={"no_such_mixer": {}}), r"mixer_options: unknown mixer 'no_such_mixer'"),
    (dict(mixers="swa", impl="pallas"),
     r"impl: mixer 'swa' \(SlidingWindowAttention\) does not support impl='pallas'; its impls are "
     r"\('auto', 'chunked', 'recurrent'\) \(override it for this mixer with "
     r"mixer_options=\{'swa': \{'impl': \.\.\.\}\}\)"),
    (dict(mixers=("linear_attention", "delta_net"), impl="associative"),
     r"impl: mixer 'delta_net' \(DeltaNet\) does not support impl='associative'.*"
     r"mixer_options=\{'delta_net': \{'impl'"),
    (dict(mixers="swa", mixer_options={"swa": {"impl": "pallas"}}),
     r"mixer_options\['swa'\]\['impl'\]: mixer 'swa' \(SlidingWindowAttention\) does not support impl='pallas'"),
    (dict(impl="fastest"), r"impl: got 'fastest', expected one of .*the implementation vocabulary is"),
    (dict(impl="parallel"), r"impl: got 'parallel'"),
    (dict(vocab_size=0), r"vocab_size: expected a positive int, got 0"),
    (dict(mlp_hidden=-4), r"mlp_hidden: expected a positive int"),
    (dict(param_dtype=jnp.int32), r"param_dtype: expected a floating dtype"),
    (dict(mixer_options={"swa": {"window": 0}}, mixers="swa"), r"mixer 'swa': window: expected a positive int"),
])
def test_bad_config_raises(over, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**{**BASE, **over})


def test_per_mixer_impl_override():
    cfg = LMConfig(**{**BASE, "mixers": ("linear_attention", "swa"), "impl": "pallas",
                      "mixer_options": {"swa": {"impl": "chunked"}}})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    assert [b.mixer.impl for b in model.blocks] == ["pallas", "chunked"]
    assert cfg.options_for("swa") == {"impl": "chunked"}
    # a rule-specific model-wide impl (TTT's dual form) with the other mixer overridden
    with pytest.raises(ValueError, match=r"impl: mixer 'swa' \(SlidingWindowAttention\) does not support "
                                         r"impl='dual'.*mixer_options=\{'swa': \{'impl': \.\.\.\}\}"):
        LMConfig(**{**BASE, "mixers": ("ttt_linear", "swa"), "impl": "dual"})
    cfg = LMConfig(**{**BASE, "mixers": ("ttt_linear", "swa"), "impl": "dual",
                      "mixer_options": {"swa": {"impl": "recurrent"}}})
    assert [b.mixer.impl for b in LanguageModel(cfg, rngs=nnx.Rngs(0)).blocks] == ["dual", "recurrent"]


def test_bad_call_inputs_raise():
    model = LanguageModel(LMConfig(**BASE), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens: expected an integer dtype"):
        model(jnp.zeros((B, T), jnp.float32))
    with pytest.raises(ValueError, match=r"tokens: expected a rank-2 array"):
        model(jnp.zeros((T,), jnp.int32))
    with pytest.raises(ValueError, match=r"cache\['layers'\]: expected 2 layer caches, got 1"):
        c = model.init_cache(B)
        model(jnp.zeros((B, 1), jnp.int32), cache={**c, "layers": c["layers"][:1]})
    with pytest.raises(ValueError, match=r"max_new_tokens: expected a positive int, got 0"):
        generate(model, jnp.zeros((B, 2), jnp.int32), 0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"top_k: expected at most vocab_size = 13, got 20"):
        generate(model, jnp.zeros((B, 2), jnp.int32), 3, rng=jax.random.key(0), temperature=1.0, top_k=20)
    with pytest.raises(ValueError, match=r"temperature: expected a float >= 0, got -1.0"):
        generate(model, jnp.zeros((B, 2), jnp.int32), 3, rng=jax.random.key(0), temperature=-1.0)
    with pytest.raises(ValueError, match=r"LMConfig"):
        LanguageModel({"width": 8}, rngs=nnx.Rngs(0))


def test_numpy_and_jax_scalars_in_config():
    """LMConfig accepts NumPy / JAX integer and float scalars and stores Python numbers, so
    the config equals (and hashes like) the one written with Python numbers."""
    cfg = LMConfig(vocab_size=np.int64(V), width=jnp.int32(8), num_layers=np.int32(2),
                   num_heads=np.int64(2), head_dim=np.int64(4), mlp_hidden=jnp.int32(12),
                   norm_eps=np.float32(0.5), embed_init_std=jnp.float32(0.25), mixers="swa")
    ref = LMConfig(vocab_size=V, width=8, num_layers=2, num_heads=2, head_dim=4, mlp_hidden=12,
                   norm_eps=float(np.float32(0.5)), embed_init_std=float(jnp.float32(0.25)), mixers="swa")
    assert cfg == ref and hash(cfg) == hash(ref)
    assert all(type(getattr(cfg, f)) is int for f in ("vocab_size", "width", "num_layers", "num_heads",
                                                      "head_dim", "mlp_hidden"))
    assert type(cfg.norm_eps) is float and type(cfg.embed_init_std) is float
    with pytest.raises(ValueError, match=r"num_layers: expected a positive int, got True"):
        LMConfig(**{**BASE, "num_layers": True})
    with pytest.raises(ValueError, match=r"norm_eps: expected a positive float"):
        LMConfig(**{**BASE, "norm_eps": 0.0})
