"""Recall recipes (tttla_jax.nn.recipes, docs/recipes.md): the same four options in every mixer.

* every mixer that has them builds and runs with each recipe option on, and with all of them;
* with the recipe conv on, any split of a sequence through the decoding cache equals one call
  (outputs, final cache; gradients w.r.t. x and the parameters in the @slow run; float64 at
  1e-10), and a packed call (``cu_seqlens``) equals every document alone, likewise;
* the default options keep every mixer as it was: the older option names give the same layer
  as the new ones, a default layer has no recipe parameters or cache entries it did not have,
  and its output equals a direct composition of its own parts;
* bad values are ValueErrors naming the option; every recall preset builds its mixer.

Default suite: two mixers decode with all options on (forward), one packed: 17 tests, 30 s
measured alone (load 1.8–4.9); the rest of the sweep (the other mixers, each option alone,
gradients) is @slow.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.nn import MIXERS
from tttla_jax.nn.layers import ShortConv
from tttla_jax.nn.mixers import DeltaNet, LinearAttention, mixer_options
from tttla_jax.nn.model import LMConfig
from tttla_jax.nn.recipes import (FEATURE_MAPS, RECALL_PRESETS, RECIPE_OPTIONS, feature_map,
                                  recall_options)
from tttla_jax.ops.linear_attention import linear_attention
from tttla_jax.testing import assert_trees_close

W, H = 8, 2
TOL = dict(rtol=1e-10, atol=1e-12)

#: tiny options per mixer (chunks / mini-batches of 2 tokens)
SMALL = {
    "linear_attention": dict(chunk_size=2),
    "delta_net": dict(chunk_size=2),
    "swa": dict(window=3),
    "lact": dict(chunk_size=2),
    "ttt_linear": dict(mini_batch_size=2),
    "ttt_mlp": dict(mini_batch_size=2, mlp_expansion=1),
    "titans": dict(chunk_size=2, batch_size=4, block_tokens=2),
}
ALL_ON = dict(short_conv=3, feature_map="silu", qk_norm=True, head_norm=True)


def _recipe_mixers():
    """Registered mixers that take every recipe option."""
    return sorted(n for n, c in MIXERS.items() if set(RECIPE_OPTIONS) <= set(mixer_options(c)))


def _build(name, **extra):
    return MIXERS[name](width=W, num_heads=H, dtype=jnp.float64, param_dtype=jnp.float64,
                        rngs=nnx.Rngs(0), **{**SMALL.get(name, {}), **extra})


def _x(T, B=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, W), jnp.float64)


def _weigh(tree, seed):
    """A fixed generic scalar of a tree's floating leaves (every leaf gets a gradient)."""
    total = 0.0
    for i, a in enumerate(a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)):
        w = jnp.sin(jnp.arange(a.size, dtype=jnp.float64) * (0.37 + 0.11 * i) + seed).reshape(a.shape)
        total = total + jnp.sum(a.astype(jnp.float64) * w)
    return total


def test_every_mixer_with_recipes_is_found():
    # the mixers this file covers: all of the library's own token mixers
    assert {"linear_attention", "delta_net", "swa", "lact", "ttt_linear", "ttt_mlp",
            "titans"} <= set(_recipe_mixers())


@pytest.mark.slow  # every mixer runs with all options on in the default suite (decoding test)
@pytest.mark.parametrize("name", _recipe_mixers())
def test_each_recipe_option_builds_and_runs(name):
    x = _x(5)
    base = _build(name)
    y0, c0 = base(x)
    for opts in (dict(short_conv=2), dict(feature_map="relu" if base.feature_map != "relu" else "silu"), dict(qk_norm=not base.qk_norm),
                 dict(head_norm=not _has_head_norm(base)), ALL_ON):
        m = _build(name, **opts)
        y, c = m(x)
        assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y))), opts
        assert not np.array_equal(np.asarray(y), np.asarray(y0)), f"{opts} changed nothing"
        conv = sorted(k for k in c if k.startswith("conv_"))
        if opts.get("short_conv"):
            assert conv == ["conv_k", "conv_q", "conv_v"], conv
            assert isinstance(m.q_conv, ShortConv) and m.q_conv.kernel_size == opts["short_conv"]
            assert c["conv_q"].shape == (2, opts["short_conv"] - 1, H * m.head_dim)


def _has_head_norm(m):
    return bool(getattr(m, "head_norm", False))


def _check_split(m, x, pieces, grads):
    """One call == the same sequence fed in ``pieces`` through the cache: outputs, final
    cache and, with ``grads``, gradients (x and parameters) of a generic scalar of both."""
    graphdef, params = nnx.split(m)
    B, T = x.shape[:2]
    cuts = np.concatenate([[0], np.cumsum(pieces)])
    assert cuts[-1] == T

    def full(params, x):
        y, c = nnx.merge(graphdef, params)(x)
        return _weigh(y, 1.0) + _weigh(c, 2.0), (y, c)

    def split(params, x):
        mm = nnx.merge(graphdef, params)
        c, ys = mm.init_cache(B), []
        for a, b in zip(cuts[:-1], cuts[1:]):
            y, c = mm(x[:, a:b], cache=c)
            ys.append(y)
        y = jnp.concatenate(ys, axis=1)
        return _weigh(y, 1.0) + _weigh(c, 2.0), (y, c)

    if not grads:
        (_, (yf, cf)), (_, (ys, cs)) = full(params, x), split(params, x)
    else:
        vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
        (_, (yf, cf)), gf = vg(full)(params, x)
        (_, (ys, cs)), gs = vg(split)(params, x)
        assert_trees_close(gs[1], gf[1], name="gradient w.r.t. x", **TOL)
        assert_trees_close(gs[0], gf[0], name="gradient w.r.t. the parameters", **TOL)
    assert_trees_close(ys, yf, name="outputs (split vs one call)", **TOL)
    assert_trees_close(cs, cf, name="final cache (split vs one call)", **TOL)


GRADS = [False, pytest.param(True, marks=pytest.mark.slow)]  # gradients: the @slow run


#: decoded in the default suite (the others, slower to run eagerly, @slow)
DECODE_DEFAULT = ("linear_attention",)  # the TTT case is @slow (13 s): test-suite budget


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("name", [n if n in DECODE_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _recipe_mixers()])
def test_decoding_with_recipes_equals_one_call(name, grads):
    """The recipe conv's taps ride in the cache: pieces of 2, 1 (a decoding step), 3 tokens."""
    _check_split(_build(name, **ALL_ON), _x(6), (2, 1, 3), grads)


def _packs(name):
    return "cu_seqlens" in inspect.signature(MIXERS[name].__call__).parameters


#: the default suite packs one mixer (the cheapest: its conv in front of the packed chunked op);
#: @slow all, including the TTT layers' conv in front of a segment cache
PACKED_DEFAULT = ("linear_attention",)


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("name", [n if n in PACKED_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _recipe_mixers() if _packs(n)])
def test_packed_with_recipes_equals_documents_alone(name, grads):
    """Packed documents (lengths 3, 1, 4): the conv never crosses a boundary; outputs, per
    document caches and gradients equal every document run alone."""
    m = _build(name, **ALL_ON)
    lens = (3, 1, 4)
    offs = np.concatenate([[0], np.cumsum(lens)])
    cu = jnp.asarray(offs, jnp.int32)
    x = _x(int(offs[-1]), B=1, seed=3)
    graphdef, params = nnx.split(m)
    row = lambda c, i: jax.tree.map(lambda a: a[i:i + 1], c)  # noqa: E731

    def packed(params, x):
        y, c = nnx.merge(graphdef, params)(x, cu_seqlens=cu)
        return _weigh(y, 1.0) + sum(_weigh(row(c, i), 2.0 + i) for i in range(len(lens))), (y, c)

    def alone(params, x):
        mm, ys, cs, total = nnx.merge(graphdef, params), [], [], 0.0
        for i in range(len(lens)):
            y, c = mm(x[:, offs[i]:offs[i + 1]])
            ys.append(y)
            cs.append(c)
            total = total + _weigh(c, 2.0 + i)
        y = jnp.concatenate(ys, axis=1)
        return total + _weigh(y, 1.0), (y, cs)

    if not grads:
        (_, (yp, cp)), (_, (ya, ca)) = packed(params, x), alone(params, x)
    else:
        vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
        (_, (yp, cp)), gp = vg(packed)(params, x)
        (_, (ya, ca)), ga = vg(alone)(params, x)
        assert_trees_close(gp[1], ga[1], name="gradient w.r.t. x", **TOL)
        assert_trees_close(gp[0], ga[0], name="gradient w.r.t. the parameters", **TOL)
    assert_trees_close(yp, ya, name="packed outputs", **TOL)
    for i in range(len(lens)):
        assert_trees_close(row(cp, i), ca[i], name=f"cache of document {i}", **TOL)


# ------------------------------------------------------------------ defaults unchanged

def _params(m):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(m, nnx.Param))[0]}


def _same_layer(a, b, x):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    (ya, ca), (yb, cb) = a(x), b(x)
    np.testing.assert_array_equal(np.asarray(ya), np.asarray(yb))
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(np.asarray(ca[k]), np.asarray(cb[k]), err_msg=k)


def test_older_option_names_give_the_same_layer():
    x = _x(5)
    _same_layer(_build("delta_net", use_short_conv=False), _build("delta_net", short_conv=0), x)
    _same_layer(_build("delta_net", conv_size=3), _build("delta_net", short_conv=3), x)


@pytest.mark.slow
def test_older_option_names_give_the_same_layer_sweep():
    x = _x(5)
    _same_layer(_build("delta_net"), _build("delta_net", short_conv=4), x)  # default conv_size 4
    _same_layer(_build("lact", qkv_silu=False), _build("lact", qkv_silu=False, feature_map="identity"), x)
    _same_layer(_build("lact"), _build("lact", feature_map="silu"), x)
    _same_layer(_build("titans", qk_norm=False), _build("titans", qk_norm=False, feature_map="identity"), x)


@pytest.mark.parametrize("name", _recipe_mixers())
def test_default_layers_have_no_recipe_extras(name):
    """A default layer has exactly the conv / output-norm parameters and cache entries it had
    before the recipes: a conv only in DeltaNet, a per-head norm only where the layer had one."""
    m = _build(name)
    conv = {"delta_net": 4}.get(name, 0)
    assert m.short_conv == conv
    assert (m.q_conv is None) == (conv == 0)
    cache = m.init_cache(1)
    assert {k for k in cache if k.startswith("conv_")} == ({"conv_q", "conv_k", "conv_v"} if conv else set())
    had_norm = name in ("linear_attention", "delta_net", "titans")
    assert (getattr(m, "out_norm", None) is not None) == had_norm
    if name == "lact":
        assert m.ttt_norm is not None and m.qk_norm is True and m.feature_map == "silu"
    if name in ("ttt_linear", "ttt_mlp", "swa"):
        assert m.feature_map == "identity" and not m.qk_norm and not m.head_norm


def test_default_linear_attention_is_its_parts():
    """The default LinearAttention output is, from its own parameters, elu+1 feature maps,
    causal linear attention, a per-head RMSNorm and o_proj (what it computed before)."""
    m = _build("linear_attention")
    x = _x(5)
    B, T = x.shape[:2]
    heads = lambda a: a.reshape(B, T, H, -1)  # noqa: E731
    q = jax.nn.elu(heads(m.q_proj(x))) + 1
    k = jax.nn.elu(heads(m.k_proj(x))) + 1
    o, _ = linear_attention(q, k, heads(m.v_proj(x)), impl="recurrent")
    D = o.shape[-1]
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6) * m.out_norm.scale[...]
    want = m.o_proj(o.reshape(B, T, H * D))
    assert_trees_close(m(x)[0], want, name="default LinearAttention", **TOL)


# ------------------------------------------------------------------ validation, presets

def test_feature_maps():
    x = jnp.linspace(-3.0, 3.0, 12, dtype=jnp.float64).reshape(2, 6)
    n = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
    want = {"identity": x, "silu": x * jax.nn.sigmoid(x), "elu+1": jnp.where(x > 0, x + 1, jnp.exp(x)),
            "relu": jnp.maximum(x, 0), "silu+l2": n(x * jax.nn.sigmoid(x)), "l2": n(x)}
    assert set(want) == set(FEATURE_MAPS)
    for name, w in want.items():
        assert_trees_close(feature_map(name, x), w, name=name, **TOL)


@pytest.mark.parametrize("name", ["linear_attention", "ttt_linear"])
def test_bad_recipe_options_name_the_option(name):
    for bad in (-1, True, 2.5, "4"):
        with pytest.raises(ValueError, match=r"short_conv: expected an int >= 0.*got"):
            _build(name, short_conv=bad)
    with pytest.raises(ValueError, match=r"feature_map.*'softmax'"):
        _build(name, feature_map="softmax")
    for opt in ("qk_norm", "head_norm"):
        with pytest.raises(ValueError, match=rf"{opt}: expected True or False, got 'yes'"):
            _build(name, **{opt: "yes"})
    with pytest.raises(ValueError, match="short_conv.*share_qk"):
        _build("ttt_linear", share_qk=True, short_conv=4)


def test_recall_presets_build_their_mixers():
    assert RECALL_PRESETS, "no recall preset"
    for name, opts in RECALL_PRESETS.items():
        assert set(opts) <= set(mixer_options(MIXERS[name])), (name, opts)
        cfg = LMConfig(vocab_size=16, width=W, num_layers=1, num_heads=H, mixers=(name,),
                       mixer_options=recall_options(name))
        assert dict(cfg.options_for(name)) == opts
    with pytest.raises(ValueError, match="no recall preset for mixer 'nope'"):
        recall_options("nope")
