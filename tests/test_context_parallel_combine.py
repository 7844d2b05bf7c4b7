"""The associative (combined) sequence-parallel form of the LaCT layer (ladder V2–V6) and the
Titans layer (linear memory): tttla_jax.parallel.combine (docs/context_parallel.md).

On 8 forced host CPU devices (one subprocess; compilation dominates): the layer under
``sequence_parallel`` inside ``shard_map`` equals the single-device call in float64 at 1e-10
— outputs, the final cache and the gradients of a loss of both w.r.t. the input and every
parameter; through ``sharded_mixer`` with T not a multiple of the devices (padded at the
end); the combined form is really taken (``combine_reason`` is None, and trace-time spies: a
fresh combined call never reaches ``mixer_apply``, the pipelined form) and the pipelined
fallback for the cases it does not cover (V0/V1, the MLP memory, an unaligned slice
continuing a cache, LaCT with a window on packed documents continuing a cache) still equals
one device. Unaligned
unpacked slices on a fresh call (``T_local`` not a multiple of the chunk / TTT batch) run
combined, every row as one packed document: LaCT V2 (with and without Muon, window and conv
halos), V3–V6 and Titans at seq = 2, 4, 8, chunks / batches spanning two and three devices,
``T`` not a multiple of ``P`` (padded). LaCT and Titans with packed documents
(a fresh call) run combined: documents cross device boundaries at every phase within a chunk /
TTT batch (exactly at a boundary too), chunks / batches spanning three devices, documents
shorter than a chunk, empty documents, ``T`` not a multiple of ``P·C``; packed documents also
continuing a per-document cache (LaCT V2–V6 and Titans: a crossing chunk / batch begun in the
cache's buffer, chunks and batches over three devices, LaCT entries with ``buf_len`` 0 and C,
a conv halo; LaCT with a window stays pipelined). A Titans cache runs combined at a
TTT-batch boundary and pipelined inside a batch, a LaCT cache combined at a chunk boundary
(``buf_len`` 0 or C, per row) and pipelined inside a chunk (chosen at run time). The
default suite keeps three cases (LaCT V2 with the window branch and a short conv whose halos
span devices; packed documents and an unaligned slice, outputs and caches only); the sweep over
seq = 2, 4, 8, Titans (fresh and continuing a cache), the padded calls, the gradients of the
unaligned and packed forms and the fallbacks are ``@slow``.
"""
import textwrap

import pytest
from _devices import run_checks

TOL = 1e-10

CHECKS = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from tttla_jax.nn import MIXERS
    from tttla_jax.parallel import sequence_parallel, sharded_mixer
    from tttla_jax.parallel.combine import combine_reason
    import tttla_jax.parallel.context as ctxmod
    import tttla_jax.parallel.combine as cmb
    F64 = jnp.float64

    # trace-time spies: which sequence-parallel form a call takes (the pipelined form is
    # mixer_apply; an unaligned fresh call runs its rows as one-document packed calls)
    CALLS = {}

    def spy(mod, name, key):
        orig = getattr(mod, name)
        def wrapped(*a, **k):
            CALLS[key] = CALLS.get(key, 0) + 1
            return orig(*a, **k)
        setattr(mod, name, wrapped)

    spy(ctxmod, "mixer_apply", "pipelined")
    spy(cmb, "combined_apply", "combined")
    spy(cmb, "_rows_as_documents", "rows_as_documents")

    # diff(a, b), weights(shape, seed): tests/_devices.py CHECK_HELPERS

    def loss_of(w):
        def loss(out):  # outputs and every floating cache entry reach the loss
            y, cache = out
            fl = [c for c in jax.tree.leaves(cache) if jnp.issubdtype(c.dtype, jnp.floating)]
            return jnp.sum(y * w) + sum(jnp.sum(jnp.sin(c)) for c in fl)
        return loss

    def check(name, opts, seq, T, Tpad=None, B=2, W=8, packed=None, cached=False, buf=None, grads=True):
        m = MIXERS[name](width=W, num_heads=2, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0), **opts)
        gd, st = nnx.split(m)
        mesh = Mesh(np.asarray(jax.devices()[:seq]), ("seq",))
        out = {"reason": combine_reason(m, T // seq, cache={} if cached else None,
                                        cu_seqlens=packed)}
        Bx = 1 if packed is not None else B
        x = jax.random.normal(jax.random.key(1), (Bx, T, W), F64)
        kw = {} if packed is None else {"cu_seqlens": jnp.asarray(packed, jnp.int32)}
        NB = Bx if packed is None else len(packed) - 1
        nc = 3 if cached is True else int(cached)  # tokens before the call (cached=True: 3)
        c0 = m(jax.random.normal(jax.random.key(2), (NB, nc, W), F64))[1] if cached else None
        if buf is not None:  # per-row buf_len overrides (None: keep), e.g. 0: a LaCT row from W^(0)
            c0["buf_len"] = jnp.asarray([c0["buf_len"][i] if b is None else b for i, b in enumerate(buf)],
                                        jnp.int32)
        if cached:
            out["buf_len"] = [int(b) for b in c0["buf_len"]]
        cshape = jax.eval_shape(lambda: m.init_cache(NB))
        loss = loss_of(weights((Bx, T, W)))

        def inside(st, x, c):
            with sequence_parallel("seq"):
                return nnx.merge(gd, st)(x, cache=c, **kw)

        cspec = jax.tree.map(lambda _: P(), cshape)
        sp = jax.shard_map(inside, mesh=mesh, in_specs=(P(), P(None, "seq"), None if c0 is None else cspec),
                           out_specs=(P(None, "seq"), cspec))
        ref = lambda st, x, c: nnx.merge(gd, st)(x, cache=c, **kw)
        vg = lambda f: jax.jit(jax.value_and_grad(lambda st, x, c: (lambda o: (loss(o), o))(f(st, x, c)),
                                                  argnums=(0, 1), has_aux=True))
        if not grads:  # outputs and final cache only (the gradients: the @slow sweep)
            vg = lambda f: jax.jit(lambda st, x, c: (lambda o: ((loss(o), o), None))(f(st, x, c)))  # noqa: E731
        (l0, o0), g0 = vg(ref)(st, x, c0)
        CALLS.clear()
        (l1, o1), g1 = vg(sp)(st, x, c0)
        out["calls"] = dict(CALLS)
        out.update(y=diff(o0[0], o1[0]), cache=diff(o0[1], o1[1]), loss=abs(float(l0 - l1)),
                   y_scale=float(jnp.max(jnp.abs(o0[0]))))
        if grads:
            out["grads"] = diff(g0, g1)
        if Tpad is not None:  # sharded_mixer pads T to a multiple of seq (the cache then holds the padding)
            xp = jax.random.normal(jax.random.key(5), (Bx, Tpad, W), F64)
            wp = weights((Bx, Tpad, W))
            kp = {}
            if packed is not None:  # the same documents cut at Tpad (the padding joins the last one)
                kp = {"cu_seqlens": jnp.asarray([min(c, Tpad) for c in packed[:-1]] + [Tpad], jnp.int32)}
            f = lambda g: jax.jit(jax.value_and_grad(lambda st, x: jnp.sum(g(st, x) * wp), argnums=(0, 1)))
            a0, h0 = f(lambda st, x: nnx.merge(gd, st)(x, **kp)[0])(st, xp)
            a1, h1 = f(lambda st, x: sharded_mixer(nnx.merge(gd, st), x, mesh=mesh, **kp))(st, xp)
            out.update(pad_loss=abs(float(a0 - a1)), pad_grads=diff(h0, h1))
        return out

    results = {}
    for case in json.loads(sys.argv[1]):
        key = case.pop("id")
        results[key] = check(**case)
        print("CASE", key, json.dumps(results[key]), flush=True)
    print("RESULT" + json.dumps(results))
''')

# (id, expected to take the combined form, case)
DEFAULT_CASES = [
    # LaCT V2 (SwiGLU features, momentum, Muon) with the window branch (window 3 > the 2
    # tokens of a device) and a short conv (2 taps of halo): every halo spans devices
    (True, dict(id="lact_v2_win_conv_seq4", name="lact", seq=4, T=8,
                opts={"preset": "v2", "chunk_size": 2, "window": 3, "short_conv": 3})),
    # LaCT V2 with packed documents, outputs and final caches (gradients: the @slow sweep):
    # document 1 crosses the device boundary with 2 of its chunk's 3 tokens on device 0
    (True, dict(id="lact_v2_packed_seq2", name="lact", seq=2, T=6, packed=[0, 1, 6], grads=False,
                opts={"preset": "v2", "chunk_size": 3})),
    # unaligned unpacked slices (a fresh call): 4 x 3 tokens, chunk 4, every row one packed
    # document (outputs and final cache; gradients: the @slow sweep)
    (True, dict(id="lact_v2_unaligned_seq4", name="lact", seq=4, T=12, grads=False, rows=True,
                opts={"preset": "v2", "chunk_size": 4})),
]
SLOW_CASES = [
    (True, dict(id="lact_v2_seq2", name="lact", seq=2, T=16, Tpad=13, opts={"preset": "v2", "chunk_size": 4})),
    (True, dict(id="lact_v3_win_seq8", name="lact", seq=8, T=16, Tpad=13,
                opts={"preset": "v3", "chunk_size": 2, "window": 3, "short_conv": 3})),
    (True, dict(id="lact_v4_seq4", name="lact", seq=4, T=16, opts={"preset": "v4", "chunk_size": 2})),
    (True, dict(id="lact_v5_seq4", name="lact", seq=4, T=16, Tpad=15, opts={"preset": "v5", "chunk_size": 2})),
    (True, dict(id="lact_v6_seq8", name="lact", seq=8, T=16, opts={"preset": "v6", "chunk_size": 2})),
    (True, dict(id="titans_seq2", name="titans", seq=2, T=16, Tpad=13, opts={"chunk_size": 2, "batch_size": 4})),
    (True, dict(id="titans_conv_seq4", name="titans", seq=4, T=16,
                opts={"chunk_size": 2, "batch_size": 4, "short_conv": 3})),
    (True, dict(id="titans_seq8", name="titans", seq=8, T=16, Tpad=11,
                opts={"chunk_size": 1, "batch_size": 2})),
    # unaligned unpacked slices on a fresh call: combined, each row one packed document.
    # 8 x 2 tokens, chunk 3: chunks span 2 and 3 devices; window and conv halos; T = 13 padded
    (True, dict(id="lact_v2_unaligned_win_conv_seq8", name="lact", seq=8, T=16, Tpad=13, rows=True,
                opts={"preset": "v2", "chunk_size": 3, "window": 3, "short_conv": 3})),
    # no Muon (momentum kept), 4 x 3 tokens, chunk 4 (T = 11 padded to 12)
    (True, dict(id="lact_v2_nomuon_unaligned_seq4", name="lact", seq=4, T=12, Tpad=11, rows=True,
                opts={"preset": "v2", "muon": False, "chunk_size": 4})),
    # 2 x 5 tokens, chunk 4: the second chunk straddles the boundary
    (True, dict(id="lact_v2_unaligned_seq2", name="lact", seq=2, T=10, Tpad=9, rows=True,
                opts={"preset": "v2", "chunk_size": 4, "window": 2})),
    (True, dict(id="lact_v3_unaligned_seq4", name="lact", seq=4, T=12, rows=True,
                opts={"preset": "v3", "chunk_size": 5})),
    (True, dict(id="lact_v4_unaligned_seq8", name="lact", seq=8, T=24, rows=True,
                opts={"preset": "v4", "chunk_size": 5})),
    (True, dict(id="lact_v5_unaligned_seq4", name="lact", seq=4, T=12, Tpad=11, rows=True,
                opts={"preset": "v5", "chunk_size": 2})),
    (True, dict(id="lact_v6_unaligned_seq2", name="lact", seq=2, T=10, rows=True,
                opts={"preset": "v6", "chunk_size": 4})),
    # Titans: 4 x 3 tokens, batch 4; 8 x 2 tokens, batch 5 (batches over 3 devices) with a
    # conv halo; 2 x 5 tokens, batch 4 (T = 9 padded)
    (True, dict(id="titans_unaligned_seq4", name="titans", seq=4, T=12, Tpad=10, rows=True,
                opts={"chunk_size": 2, "batch_size": 4})),
    (True, dict(id="titans_unaligned_conv_seq8", name="titans", seq=8, T=16, rows=True,
                opts={"chunk_size": 1, "batch_size": 5, "short_conv": 3})),
    (True, dict(id="titans_unaligned_seq2", name="titans", seq=2, T=10, Tpad=9, rows=True,
                opts={"chunk_size": 2, "batch_size": 4})),
    # the pipelined fallback
    # an unaligned slice continuing a cache (LaCT at a chunk boundary, Titans at a batch one)
    (False, dict(id="lact_v2_cache_unaligned_seq4", name="lact", seq=4, T=12, cached=4,
                 opts={"preset": "v2", "chunk_size": 4})),
    (False, dict(id="titans_cache_unaligned_seq4", name="titans", seq=4, T=12, cached=4,
                 opts={"chunk_size": 2, "batch_size": 4})),
    (False, dict(id="lact_v1_seq4", name="lact", seq=4, T=8, opts={"preset": "v1", "chunk_size": 2})),
    (False, dict(id="titans_mlp_seq4", name="titans", seq=4, T=16,
                 opts={"chunk_size": 2, "batch_size": 4, "memory": "mlp"})),
    # LaCT continuing a cache: inside a chunk (3 tokens before, chunk 2: buf_len 1) the run-time
    # choice takes the pipelined branch; at a chunk boundary (a whole buffered chunk, buf_len C:
    # its pending update first; or buf_len 0: W^(0), the cache's conv taps, window and positions;
    # or both, one per row) the combined one (each ~20 s: @slow)
    (True, dict(id="lact_v2_cache_midchunk_seq4", name="lact", seq=4, T=8, cached=3,
                want_buf=[1, 1], opts={"preset": "v2", "chunk_size": 2})),
    (True, dict(id="lact_v2_cache_full_win_conv_seq4", name="lact", seq=4, T=8, cached=4,
                want_buf=[2, 2], opts={"preset": "v2", "chunk_size": 2, "window": 3, "short_conv": 3})),
    (True, dict(id="lact_v3_cache_rows_0_C_seq8", name="lact", seq=8, T=16, cached=4, buf=[0, None],
                want_buf=[0, 2], opts={"preset": "v3", "chunk_size": 2, "window": 3, "short_conv": 3})),
    (True, dict(id="lact_v5_cache_empty_seq2", name="lact", seq=2, T=8, cached=3, buf=[0, 0],
                want_buf=[0, 0], opts={"preset": "v5", "chunk_size": 4})),
    # Titans continuing a cache: inside a TTT batch (3 tokens before, batch 4) the run-time
    # choice takes the pipelined branch; at a batch boundary (4 / 2 tokens before) the combined
    # one, from the cache's memory, momentum and conv taps (the case costs ~25 s: @slow)
    (True, dict(id="titans_cache_midbatch_seq4", name="titans", seq=4, T=16, cached=3,
                opts={"chunk_size": 2, "batch_size": 4})),
    (True, dict(id="titans_cache_boundary_conv_seq4", name="titans", seq=4, T=16, cached=4,
                opts={"chunk_size": 2, "batch_size": 4, "short_conv": 3})),
    (True, dict(id="titans_cache_boundary_seq8", name="titans", seq=8, T=16, cached=2,
                opts={"chunk_size": 1, "batch_size": 2})),
    # LaCT with packed documents (a fresh call): combined. h = the tokens of the crossing
    # document's current chunk on the earlier devices (1 … C; C: the boundary is a chunk boundary)
    # lengths 3, 6, 0, 3 over 4 x 3 tokens, chunk 3: document 1 crosses device 2 at h = C
    (True, dict(id="lact_v2_packed_seq4", name="lact", seq=4, T=12, packed=[0, 3, 9, 9, 12],
                opts={"preset": "v2", "chunk_size": 3})),
    # 8 x 5 tokens, chunk 4 (T = 40 not a multiple of P·C): document 1 crosses devices 1-4 at
    # h = 4, 1, 2, 3, document 2 devices 5-7 at h = 3, 4, 1
    (True, dict(id="lact_v4_packed_phases_seq8", name="lact", seq=8, T=40, packed=[0, 1, 22, 40],
                opts={"preset": "v4", "chunk_size": 4})),
    # 8 x 2 tokens, chunk 4: chunks span 3 devices; a 1-token document, an empty one; window and
    # conv halos across devices; T = 13 padded (the padding joins the last document)
    (True, dict(id="lact_v3_packed_win_conv_seq8", name="lact", seq=8, T=16, Tpad=13,
                packed=[0, 1, 11, 11, 16], opts={"preset": "v3", "chunk_size": 4, "window": 3, "short_conv": 3})),
    # no momentum (low-rank NS5), documents shorter than a chunk, 2 x 7 tokens
    (True, dict(id="lact_v5_packed_seq2", name="lact", seq=2, T=14, Tpad=11, packed=[0, 3, 5, 14],
                opts={"preset": "v5", "chunk_size": 4})),
    # no Muon; an empty document at the end; a document over 3 devices
    (True, dict(id="lact_v6_packed_seq4", name="lact", seq=4, T=12, packed=[0, 5, 12, 12],
                opts={"preset": "v6", "chunk_size": 2})),
    # documents starting exactly at device boundaries, short ones, window 2 and conv
    (True, dict(id="lact_v2_packed_starts_seq4", name="lact", seq=4, T=16, packed=[0, 4, 5, 6, 13, 16],
                opts={"preset": "v2", "chunk_size": 2, "window": 2, "short_conv": 2})),
    # Titans (linear memory) with packed documents (a fresh call): combined. h = the tokens of
    # the crossing document's current TTT batch on the earlier devices (0 … batch_size − 1)
    (True, dict(id="titans_packed_seq4", name="titans", seq=4, T=16, packed=[0, 5, 11, 16],
                opts={"chunk_size": 2, "batch_size": 4})),
    # 8 x 5 tokens, batch 4: document 1 crosses devices 1-4 at h = 0, 1, 2, 3, document 2
    # devices 5-7 at h = 3, 0, 1
    (True, dict(id="titans_packed_phases_seq8", name="titans", seq=8, T=40, packed=[0, 1, 22, 40],
                opts={"chunk_size": 2, "batch_size": 4})),
    # 8 x 2 tokens, batch 4: batches span 3 devices; a 1-token document, an empty one; conv halo;
    # T = 13 padded
    (True, dict(id="titans_packed_conv_seq8", name="titans", seq=8, T=16, Tpad=13, packed=[0, 1, 11, 11, 16],
                opts={"chunk_size": 2, "batch_size": 4, "short_conv": 3})),
    # 2 x 7 tokens, batch 6 (3 chunks), documents shorter than a batch, an empty one at the end
    (True, dict(id="titans_packed_seq2", name="titans", seq=2, T=14, packed=[0, 3, 5, 14, 14],
                opts={"chunk_size": 2, "batch_size": 6})),
    # Titans packed documents continuing a cache: combined. Each document continues from its own
    # cache entry ((S, M) and its buf_len buffered tokens); the crossing document's current TTT
    # batch may begin in its cache's buffer (h = buf_len + its tokens on earlier devices).
    # 4 x 4 tokens, batch 4, 3 tokens buffered per document: document 1 crosses device 2 at h = 2
    (True, dict(id="titans_packed_cache_seq4", name="titans", seq=4, T=16, packed=[0, 5, 11, 16], cached=3,
                want_buf=[3, 3, 3], opts={"chunk_size": 2, "batch_size": 4})),
    # 8 x 5 tokens, 2 buffered: document 1 crosses at h = 2, 3, 0, 1; document 2 (from token 24)
    # crosses device 5 with its batch begun in its cache's buffer (h = 3: 2 buffered + 1)
    (True, dict(id="titans_packed_cache_phases_seq8", name="titans", seq=8, T=40, packed=[0, 1, 24, 40],
                cached=2, want_buf=[2, 2, 2], opts={"chunk_size": 2, "batch_size": 4})),
    # 8 x 2 tokens, batch 5 (over 3 devices), 3 buffered (document 0: buf_len overridden to 0),
    # a conv halo, an empty document: document 1 crosses device 1 at h = 4 (3 from its cache)
    (True, dict(id="titans_packed_cache_conv_seq8", name="titans", seq=8, T=16, packed=[0, 1, 11, 11, 16],
                cached=3, buf=[0, None, None, None], want_buf=[0, 3, 3, 3],
                opts={"chunk_size": 1, "batch_size": 5, "short_conv": 3})),
    # LaCT packed documents continuing a cache (no window branch): combined. Each document
    # continues from its own entry (state, buf_len buffered tokens: 0 = W^(0), C = a pending
    # update); h = (buf_len + its tokens on earlier devices − 1) mod C + 1
    # lengths 3, 6, 0, 3 over 4 x 3 tokens, chunk 3, 2 buffered: document 1 crosses device 2 at h = 2
    (True, dict(id="lact_v2_packed_cache_seq4", name="lact", seq=4, T=12, packed=[0, 3, 9, 9, 12], cached=2,
                want_buf=[2, 2, 2, 2], opts={"preset": "v2", "chunk_size": 3})),
    # 8 x 5 tokens, chunk 4, 2 buffered: document 2 (from token 24) crosses device 5 with its
    # chunk begun in its cache's buffer (h = 3: 2 buffered + 1)
    (True, dict(id="lact_v4_packed_cache_phases_seq8", name="lact", seq=8, T=40, packed=[0, 1, 24, 40],
                cached=2, want_buf=[2, 2, 2], opts={"preset": "v4", "chunk_size": 4})),
    # 8 x 2 tokens, chunk 4 (over 3 devices), a conv halo: document 0 from W^(0) (buf_len 0),
    # document 1 with a pending whole chunk (buf_len C), an empty one, document 3 with 2 buffered
    # crossing device 6 at h = 3 (2 from its cache)
    (True, dict(id="lact_v3_packed_cache_conv_seq8", name="lact", seq=8, T=16, packed=[0, 1, 11, 11, 16],
                cached=4, buf=[0, None, None, 2], want_buf=[0, 4, 4, 2],
                opts={"preset": "v3", "chunk_size": 4, "short_conv": 3})),
    # no momentum (V5), 2 x 7 tokens; no Muon (V6)
    (True, dict(id="lact_v5_packed_cache_seq2", name="lact", seq=2, T=14, packed=[0, 3, 5, 14], cached=3,
                opts={"preset": "v5", "chunk_size": 4})),
    (True, dict(id="lact_v6_packed_cache_seq4", name="lact", seq=4, T=12, packed=[0, 5, 12, 12], cached=1,
                opts={"preset": "v6", "chunk_size": 2})),
    # packed documents that stay pipelined: LaCT with a window continuing a cache, V1, the MLP memory
    (False, dict(id="lact_v2_win_packed_cache_seq4", name="lact", seq=4, T=12, packed=[0, 3, 9, 9, 12], cached=2,
                 opts={"preset": "v2", "chunk_size": 3, "window": 2})),
    (False, dict(id="lact_v1_packed_seq4", name="lact", seq=4, T=12, packed=[0, 3, 9, 9, 12],
                 opts={"preset": "v1", "chunk_size": 3})),
    (False, dict(id="titans_mlp_packed_seq4", name="titans", seq=4, T=16, packed=[0, 5, 11, 16],
                 opts={"chunk_size": 2, "batch_size": 4, "memory": "mlp"})),
]


def _check(cases, timeout=3000):
    # want_buf: the cache's buf_len per row the case is about; rows: an unaligned fresh call whose
    # rows run as one-document packed calls (both checked, not passed on)
    res = run_checks(CHECKS, [{k: v for k, v in c.items() if k not in ("want_buf", "rows")} for _, c in cases],
                     devices=8, timeout=timeout)
    assert set(res) == {c["id"] for _, c in cases}
    for combined, c in cases:
        r = res[c["id"]]
        assert (r["reason"] is None) == combined, (c["id"], r["reason"])
        # the form really taken (trace-time spies): the pipelined form is mixer_apply; a fresh
        # combined call never reaches it (a cache traces both branches of the run-time choice)
        calls = r["calls"]
        if combined:
            assert calls.get("combined", 0) >= 1, (c["id"], calls)
            if not c.get("cached"):
                assert calls.get("pipelined", 0) == 0, (c["id"], calls)
        else:
            assert calls.get("pipelined", 0) >= 1 and calls.get("combined", 0) == 0, (c["id"], calls)
        assert (calls.get("rows_as_documents", 0) >= 1) == c.get("rows", False), (c["id"], calls)
        assert r["y_scale"] > 1e-3, (c["id"], r)  # outputs are not trivially zero
        for what in ("y", "cache", "grads", "loss", "pad_loss", "pad_grads"):
            if what in r:
                assert r[what] <= TOL, (c["id"], what, r)
        assert ("pad_grads" in r) == ("Tpad" in c)
        assert ("grads" in r) == c.get("grads", True)
        if "want_buf" in c:
            assert r["buf_len"] == c["want_buf"], (c["id"], r["buf_len"])


def test_combined_form_equals_one_device():
    _check(DEFAULT_CASES)


@pytest.mark.slow
def test_combined_form_sweep_equals_one_device():
    """seq = 2, 4, 8; LaCT V2–V6 and Titans (linear memory), T not a multiple of seq
    (padded), the pipelined fallback (V1, MLP memory, unaligned slices, packed documents
    crossing devices) and LaCT / Titans continuing a cache (at a segment boundary: combined;
    inside one: pipelined)."""
    _check(SLOW_CASES, timeout=6000)
