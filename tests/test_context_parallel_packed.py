"""Packed documents under sequence parallelism: every mixer and the language model called
with *global* ``cu_seqlens`` inside ``jax.shard_map`` over ``"seq"`` (a document may span
several devices) equal the single-device packed call, in float64 at 1e-10: outputs, every
per-document final cache entry and gradients w.r.t. the input and every parameter (the
loss also weighs the final caches, so their gradients are checked too).

Documents: ``T`` not a multiple of the number of sequence devices (the padding is one more
document, whose cache is dropped), a document over three or more devices, an empty
document, a document starting exactly at a device boundary and non-zero per-document start
caches; each case also checks that the document boundaries change the outputs. The checks
run in ONE subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(compilation dominates); the default suite keeps one case, the language model with an
associative layer (with a short convolution) and a pipelined one (rows of packed documents
``vmap``-ed inside ``shard_map`` on a data x seq mesh, as the packed training loss); every
mixer at seq = 2, 4, 8 is ``@slow`` (the training CLI with ``--pack-documents true`` is in
tests/test_context_parallel_model.py).
"""
import os
import textwrap

import pytest
from _devices import run_checks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10
# T = 13: at seq = 4 (4 tokens a device) document 1 spans devices 0-2 and document 3 starts
# at device 3's first token; at seq = 8 (2 a device) document 1 spans devices 1-5
LENS = [2, 10, 0, 1]




CHECKS = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from tttla_jax.nn import MIXERS, LanguageModel, LMConfig
    from tttla_jax.parallel import sequence_parallel, sequence_parallel_form
    F64 = jnp.float64

    def mesh_of(data, seq):
        devs = np.asarray(jax.devices()[: data * seq]).reshape(data, seq)
        return Mesh(devs, ("data", "seq"))

    # diff(a, b), weights(shape, seed): tests/_devices.py CHECK_HELPERS

    def cache_sum(c):
        return sum(jnp.sum(v * weights(v.shape, 5)) for v in jax.tree.leaves(c) if jnp.issubdtype(v.dtype, jnp.floating))

    def rows(c, n):
        return jax.tree.map(lambda a: a[:n], c)

    def check_mixer(name, opts, seq, lens):
        W = 8
        m = MIXERS[name](width=W, num_heads=2, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0), **opts)
        gd, st = nnx.split(m)
        N, T = len(lens), sum(lens)
        pad = -T % seq
        cu = jnp.asarray(np.cumsum([0] + list(lens)), jnp.int32)
        cup = jnp.concatenate([cu, jnp.asarray([T + pad], jnp.int32)])          # the padding: one more document
        x = jax.random.normal(jax.random.key(1), (1, T, W), F64)
        pre = jax.random.normal(jax.random.key(2), (N, 3, W), F64)
        _, c0 = m(pre)                                                            # non-trivial per-document start caches
        c0p = jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), c0, m.init_cache(1))
        w = weights((1, T, W))
        mesh = mesh_of(1, seq)

        def ref(st, x):
            y, c = nnx.merge(gd, st)(x, cache=c0, cu_seqlens=cu)
            return jnp.sum(y * w) + cache_sum(c), (y, c)

        def inside(st, x, c, cu):
            with sequence_parallel("seq"):
                return nnx.merge(gd, st)(x, cache=c, cu_seqlens=cu)

        def sp(st, x):
            xp = jnp.pad(x, [(0, 0), (0, pad), (0, 0)])
            cspec = jax.tree.map(lambda _: P(), c0p)
            y, c = jax.shard_map(inside, mesh=mesh, in_specs=(P(), P(None, "seq"), cspec, P()),
                                 out_specs=(P(None, "seq"), cspec))(st, xp, c0p, cup)
            y, c = y[:, :T], rows(c, N)
            return jnp.sum(y * w) + cache_sum(c), (y, c)

        (l0, (y0, k0)), g0 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(st, x)
        (l1, (y1, k1)), g1 = jax.jit(jax.value_and_grad(sp, argnums=(0, 1), has_aux=True))(st, x)
        one_doc = m(x, cache=rows(c0, 1), cu_seqlens=jnp.asarray([0, T], jnp.int32))[0]  # boundaries ignored
        return {"form": sequence_parallel_form(m), "boundaries": diff(y0, one_doc), "y": diff(y0, y1), "cache": diff(k0, k1), "loss": abs(float(l0 - l1)),
                "grads": diff(g0, g1), "y_scale": float(jnp.max(jnp.abs(y0)))}

    def check_lm(mixers, seq, data, row_lens, options=None):
        """B = len(row_lens) rows of packed documents (each row its own cu_seqlens, the same N), batch over data,
        a vmap over the rows inside shard_map (as the packed training loss)."""
        cfg = LMConfig(vocab_size=32, width=8, num_layers=len(mixers), num_heads=2, mixers=tuple(mixers),
                       mixer_options=options or ({"swa": {"window": 3}} if "swa" in mixers else ()),
                       dtype=F64, param_dtype=F64)
        model = LanguageModel(cfg, rngs=nnx.Rngs(0))
        forms = [sequence_parallel_form(b.mixer) for b in model.blocks]
        gd, st = nnx.split(model)
        B, N = len(row_lens), len(row_lens[0])
        T = sum(row_lens[0])
        pad = -T % seq
        cus = jnp.asarray([np.cumsum([0] + list(l)) for l in row_lens], jnp.int32)
        cup = jnp.concatenate([cus, jnp.full((B, 1), T + pad, jnp.int32)], axis=1)
        tok = jax.random.randint(jax.random.key(5), (B, T), 0, 32)
        w = weights((B, T, 32))
        mesh = mesh_of(data, seq)
        baxes = "data" if data > 1 else None

        def one(st, tok, cu):
            return nnx.merge(gd, st)(tok[None], cu_seqlens=cu)

        def ref(st):
            y, c = jax.vmap(one, in_axes=(None, 0, 0))(st, tok, cus)
            return jnp.sum(y[:, 0] * w) + cache_sum(c), (y[:, 0], c)

        def inside(st, tok, cu):
            with sequence_parallel("seq"):
                return jax.vmap(one, in_axes=(None, 0, 0))(st, tok, cu)

        def sp(st):
            tp = jnp.pad(tok, [(0, 0), (0, pad)])
            cshape = jax.eval_shape(lambda: jax.vmap(lambda _: nnx.merge(gd, st).init_cache(N + 1))(jnp.arange(B)))
            cspec = jax.tree.map(lambda _: P(baxes), cshape)
            y, c = jax.shard_map(inside, mesh=mesh, in_specs=(P(), P(baxes, "seq"), P(baxes)),
                                 out_specs=(P(baxes, None, "seq"), cspec))(st, tp, cup)
            y, c = y[:, 0, :T], jax.tree.map(lambda a: a[:, :N], c)
            return jnp.sum(y * w) + cache_sum(c), (y, c)

        (l0, (y0, c0)), g0 = jax.jit(jax.value_and_grad(ref, has_aux=True))(st)
        (l1, (y1, c1)), g1 = jax.jit(jax.value_and_grad(sp, has_aux=True))(st)
        unpacked = nnx.merge(gd, st)(tok)[0]                                     # boundaries ignored
        return {"forms": forms, "boundaries": diff(y0, unpacked), "y": diff(y0, y1), "cache": diff(c0, c1), "loss": abs(float(l0 - l1)), "grads": diff(g0, g1),
                "y_scale": float(jnp.max(jnp.abs(y0)))}

    results = {}
    for case in json.loads(sys.argv[1]):
        key = case.pop("id")
        kind = case.pop("kind")
        results[key] = check_mixer(**case) if kind == "mixer" else check_lm(**case)
        print("CASE", key, json.dumps(results[key]), flush=True)
    print("RESULT" + json.dumps(results))
''')


def _run_checks(cases, timeout=3000):
    return run_checks(CHECKS, cases, devices=8, timeout=timeout)


def _assert_equal_runs(res):
    for key, r in res.items():
        assert r["y_scale"] > 1e-3, (key, r)         # outputs are not trivially zero
        assert r["boundaries"] > 1e-3, (key, r)      # and the document boundaries matter
        for what in ("y", "cache", "loss", "grads"):
            assert r[what] <= TOL, (key, what, r)


def test_packed_model_under_sequence_parallel_equals_one_device():
    """The language model with an associative layer (linear attention with a 4-tap short
    convolution: its halo spans devices and must stop at every document start) and a
    pipelined one (sliding-window attention), two rows of packed documents (their own
    cu_seqlens) on data=2 x seq=4."""
    case = dict(id="lm_data2_seq4", kind="lm", mixers=["linear_attention", "swa"], seq=4, data=2,
                row_lens=[LENS, [5, 0, 1, 7]],
                options={"linear_attention": {"short_conv": 4, "chunk_size": 2}, "swa": {"window": 3}})
    res = _run_checks([case])
    assert res["lm_data2_seq4"]["forms"] == ["associative", "pipelined"]
    _assert_equal_runs(res)


@pytest.mark.slow
def test_every_mixer_packed_at_seq_2_4_8_equals_one_device():
    """Every registered mixer (default options) packed at seq = 2, 4, 8, a few options whose
    state crosses devices mid-segment, and the language model with every mixer."""
    from tttla_jax.nn import MIXERS
    cases = [dict(id=f"{name}_seq{s}", kind="mixer", name=name, opts={}, seq=s, lens=LENS)
             for name in sorted(MIXERS) for s in (2, 4, 8)]
    cases += [
        dict(id="delta_net_chunk2_seq8", kind="mixer", name="delta_net", opts={"chunk_size": 2}, seq=8, lens=LENS),
        dict(id="linear_attention_conv_seq8", kind="mixer", name="linear_attention",
             opts={"short_conv": 4, "use_decay": True, "chunk_size": 2}, seq=8, lens=LENS),
        dict(id="ttt_linear_mb2_seq4", kind="mixer", name="ttt_linear", opts={"mini_batch_size": 2}, seq=4,
             lens=LENS),
        dict(id="lm_all_seq8", kind="lm", mixers=sorted(MIXERS), seq=8, data=1, row_lens=[LENS]),
        dict(id="lm_delta_ttt_data2_seq4", kind="lm", mixers=["delta_net", "ttt_linear"], seq=4, data=2,
             row_lens=[LENS, [5, 0, 1, 7]], options={"ttt_linear": {"mini_batch_size": 2}}),
    ]
    res = _run_checks(cases, timeout=7000)
    assert set(res) == {c["id"] for c in cases}
    _assert_equal_runs(res)


def test_packed_errors_under_sequence_parallel():
    """Global offsets are checked against the whole sequence (P x local tokens); the outside
    wrapper takes packed documents."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from tttla_jax.nn import SlidingWindowAttention
    from tttla_jax.parallel import sequence_parallel, sharded_mixer
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("seq",))
    m = SlidingWindowAttention(width=8, num_heads=2, window=4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 6, 8), jnp.float32)

    def inside(x):
        with sequence_parallel("seq"):
            return m(x, cu_seqlens=np.asarray([0, 2, 5], np.int32))[0]

    with pytest.raises(ValueError, match="cu_seqlens: .*end at T = 6.*global offsets"):
        jax.shard_map(inside, mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))(x)
    with pytest.raises(ValueError, match="cu_seqlens: .*batch of one"):
        sharded_mixer(m, jnp.ones((2, 6, 8)), mesh=mesh, cu_seqlens=jnp.asarray([0, 6]))
    cu = jnp.asarray([0, 2, 6])
    # under jit: one compile instead of an op-by-op eager shard_map (the same comparison)
    np.testing.assert_allclose(jax.jit(lambda x: sharded_mixer(m, x, mesh=mesh, cu_seqlens=cu))(x),
                               jax.jit(lambda x: m(x, cu_seqlens=cu)[0])(x), rtol=1e-6, atol=1e-6)
