"""Packed documents (``cu_seqlens``) through every mixer of ``MIXERS``: a packed call equals
every document run alone — outputs, final per-document caches and gradients w.r.t. ``x`` and
the parameters (float64, 1e-10) — with documents shorter than a chunk, longer than several
chunks, of length 1 and empty; and a packed call continuing per-document caches equals each
document continuing its own cache.

Default suite: one small configuration per mixer. ``@slow``: every impl of every mixer and
more presets / options.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttla_jax.impl import ImplError
from tttla_jax.nn import MIXERS
from tttla_jax.testing import assert_trees_close

W = 8
TOL = dict(rtol=1e-10, atol=1e-12)
# with chunks / mini-batches of 2 tokens (TTT batches of 4 for Titans): one token (shorter than
# a chunk), empty, several chunks and a partial one
LENS = (1, 0, 7)

#: small options per mixer (chunks of 2 tokens, windows of 2)
SMALL = {
    "linear_attention": dict(chunk_size=2, use_decay=True),
    "delta_net": dict(chunk_size=2, conv_size=3, use_gate=True),
    "swa": dict(window=2),
    "lact": dict(chunk_size=2, window=2, preset="v3"),   # v0 (Muon, momentum): the model test, @slow
    "ttt_linear": dict(mini_batch_size=2),
    "ttt_mlp": dict(mini_batch_size=2, mlp_expansion=1),
    "titans": dict(chunk_size=2, batch_size=4, block_tokens=2),
    "attention": dict(max_len=16, use_rope=True),
}


def _kw(name):
    return SMALL.get(name, {})


def _build(name, **extra):
    kw = {**_kw(name), **extra}
    return MIXERS[name](width=W, num_heads=2, dtype=jnp.float64, param_dtype=jnp.float64,
                        rngs=nnx.Rngs(0), **kw)


def _cu(lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)


def _float_leaves(tree):
    return [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]


def _weigh(tree, seed):
    """A fixed generic scalar of a tree's floating leaves (so every leaf gets a gradient)."""
    total = 0.0
    for i, a in enumerate(_float_leaves(tree)):
        w = jnp.sin(jnp.arange(a.size, dtype=jnp.float64) * (0.37 + 0.11 * i) + seed).reshape(a.shape)
        total = total + jnp.sum(a.astype(jnp.float64) * w)
    return total


def _row(cache, i):
    return jax.tree.map(lambda a: a[i:i + 1], cache)


def _check_packed(mixer, lens, *, seed=0, cache=None, grads=True):
    """Packed call == every document alone (outputs, caches and, with ``grads``, gradients)."""
    cu = _cu(lens)
    offs = np.concatenate([[0], np.cumsum(lens)])
    T = int(offs[-1])
    x = jax.random.normal(jax.random.key(seed), (1, T, W), jnp.float64)
    graphdef, params = nnx.split(mixer)

    def packed(params, x):
        y, c = nnx.merge(graphdef, params)(x, cache=cache, cu_seqlens=cu)
        return _weigh(y, 1.0) + sum(_weigh(_row(c, i), 2.0 + i) for i in range(len(lens))), (y, c)

    def alone(params, x):
        m = nnx.merge(graphdef, params)
        total, ys, cs = 0.0, [], []
        for i, L in enumerate(lens):
            ci = None if cache is None else _row(cache, i)
            if L == 0:  # nothing to run: the cache stays (a fresh one if none)
                yi, c = x[:, :0], (m.init_cache(1) if ci is None else ci)
            else:
                yi, c = m(x[:, offs[i]:offs[i + 1]], cache=ci)
            ys.append(yi)
            cs.append(c)
            total = total + _weigh(c, 2.0 + i)
        y = jnp.concatenate(ys, axis=1)
        return total + _weigh(y, 1.0), (y, cs)

    if grads:
        vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
        (lp, (yp, cp)), gp = vg(packed)(params, x)
        (la, (ya, ca)), ga = vg(alone)(params, x)
    else:
        lp, (yp, cp) = jax.jit(packed)(params, x)
        la, (ya, ca) = jax.jit(alone)(params, x)
    assert yp.shape == (1, T, W)
    assert_trees_close(yp, ya, name="packed outputs", **TOL)
    for i in range(len(lens)):
        assert_trees_close(_row(cp, i), ca[i], name=f"cache of document {i}", **TOL)
    if grads:
        assert_trees_close(gp[1], ga[1], name="gradient w.r.t. x", **TOL)
        assert_trees_close(gp[0], ga[0], name="gradient w.r.t. the parameters", **TOL)
    return cp


def _packed_mixers():
    return sorted(MIXERS)


#: @slow in this default check: ttt_mlp shares its packed path with ttt_linear, and the packed
#: linear_attention and delta_net layers are checked (outputs, caches, gradients, decoding) in
#: test_nn_varlen
SLOW_DEFAULT = ("ttt_mlp", "linear_attention", "delta_net")


@pytest.mark.parametrize("name", [n if n not in SLOW_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _packed_mixers()])
def test_packed_equals_documents_alone(name):
    _check_packed(_build(name), LENS)


@pytest.mark.parametrize("name", ["ttt_linear"])
def test_packed_continues_caches_forward(name):
    """Default suite: a packed call continuing per-document caches (buffered partial
    mini-batches / cached window keys) == each document continuing alone, forward."""
    mixer = _build(name)
    cache = _check_packed(mixer, LENS, grads=False)
    _check_packed(mixer, (3, 2, 0), seed=1, cache=cache, grads=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", _packed_mixers())
def test_packed_continues_per_document_caches(name):
    """A packed call continuing every document's cache == each document continuing alone."""
    mixer = _build(name)
    cache = _check_packed(mixer, LENS)
    _check_packed(mixer, (3, 2, 0), seed=1, cache=cache)


def test_packed_validation():
    m = _build("ttt_linear")
    x = jnp.ones((2, 4, W))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x, cu_seqlens=jnp.asarray([0, 4], jnp.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x[:1], cu_seqlens=jnp.asarray([0, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"cache\['W1'\].*\[N"):
        m(x[:1], cu_seqlens=jnp.asarray([0, 1, 4], jnp.int32), cache=m.init_cache(3))
    with pytest.raises(ValueError, match="positions"):
        m(x[:1], cu_seqlens=jnp.asarray([0, 1, 4], jnp.int32), positions=jnp.zeros((2, 4), jnp.int32))
    lact = _build("lact", impl="chunked", preset="v6")
    with pytest.raises(ImplError, match="impl='recurrent'"):
        lact(x[:1], cu_seqlens=jnp.asarray([0, 1, 4], jnp.int32))


def test_packed_jit_traced_cu_seqlens():
    """Under ``jit`` with a traced ``cu_seqlens``: one compile serves every split into N
    documents, each the concrete-``cu_seqlens`` call (itself == the documents alone above)."""
    m = _build("ttt_linear")
    graphdef, params = nnx.split(m)
    f = jax.jit(lambda p, x, cu: nnx.merge(graphdef, p)(x, cu_seqlens=cu))
    x = jax.random.normal(jax.random.key(3), (1, 9, W), jnp.float64)
    for lens in ((4, 0, 5), (1, 8, 0)):
        got = f(params, x, _cu(lens))
        assert_trees_close(got, m(x, cu_seqlens=np.asarray(_cu(lens))), name="jit packed", **TOL)
    assert f._cache_size() == 1


SLOW_CASES = [
    ("linear_attention", dict(impl="recurrent")), ("linear_attention", dict(impl="associative")),
    ("delta_net", dict(impl="recurrent")), ("delta_net", dict(use_short_conv=False)),
    ("swa", dict(impl="recurrent")), ("swa", dict(window=5, use_rope=False)),
    ("lact", dict(preset="v0")), ("lact", dict(impl="recurrent", preset="v6")), ("lact", dict(preset="v2", window=None)),
    ("lact", dict(preset="v0", weight_norm="pre", window=None)), ("lact", dict(preset="inner_steps")),
    ("ttt_linear", dict(impl="primal")), ("ttt_linear", dict(share_qk=True, use_gate=True)),
    ("ttt_mlp", dict(impl="primal")),
    ("titans", dict(impl="recurrent")), ("titans", dict(impl="associative")),
    ("titans", dict(memory="mlp", mlp_expansion=1)), ("titans", dict(chunk_size=2, batch_size=2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", SLOW_CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in e.items())}"
                                                        for n, e in SLOW_CASES])
def test_packed_sweep(name, extra):
    mixer = _build(name, **extra)
    cache = _check_packed(mixer, (5, 1, 0, 12, 4, 2))
    _check_packed(mixer, (1, 7, 3, 0, 4, 9), seed=2, cache=cache)
