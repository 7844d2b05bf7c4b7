"""Associative sequence-parallel forms of the LaCT layer (ladder V2–V6) and the Titans layer
(linear memory): the state entering every device from an associative combine over the
devices, then the layer's own parallel form once per device (docs/context_parallel.md,
"LaCT and Titans").

:func:`tttla_jax.parallel.mixer_apply` (the pipelined form) gives every device its exact
incoming cache after ``P − 1`` rounds of the mixer. For these two layers the state a device
hands on is an affine function of the state it receives (after a linear scan, for Muon), so
the rounds are replaced by:

1. each device computes its slice's transform of the state (given a zero incoming state);
2. ``all_gather`` + ``lax.associative_scan`` over the device axis (log depth) compose them:
   the exact state entering every device;
3. each device runs the rule once from that state on its slice (the layer's chunked /
   associative form); the state-independent parts cross devices as halos
   (:func:`tttla_jax.parallel.context.halo`: the short-conv taps, the window branch's last
   keys and values); the last device's state is the final cache.

LaCT (static φ, no weight norm, one inner step, apply-then-update: ladder V2–V6, see
docs/ladder.md): with ``G_i = ±Σ_{t∈i} lr1_t v_t φ(k_t)ᵀ`` the momentum
``M_i = ᾱ_i M_{i−1} + G_i`` is a scalar-coefficient linear recurrence — its per-device
transform ``(Π ᾱ, M from 0)`` combines like decayed linear attention's; every chunk's
``U_i = NS5(M_i)`` (or ``M_i`` without Muon) then follows from the exact incoming ``M``, and
``W1`` entering device ``p`` is ``W1_0 + Σ_{q<p} Σ_{i∈q} U_i`` (an exclusive sum over the
gathered device sums). Muon is nonlinear, but it acts on each chunk's momentum *after* the
linear scan, so only the sum is combined (the paper's parallel form, across devices). For
LaCT steps 1–3 are one pass: the rule's associative parallel form with a device ``carry``
(:func:`tttla_jax.rules.lact.parallel.parallel_form`) computes the momentum transform, takes
the incoming momentum from the combine, runs every chunk's ``NS5`` once, takes the incoming
``W1`` from the exclusive sum of the device sums and reads — nothing is computed twice.

Titans, linear memory: for ``(S, M)`` the whole rule — TTT batches included, ``W_ref`` being
the memory at each batch start — is affine in the incoming state with ``K × K`` matrix
coefficients, column by column of the ``[K, V]`` state (the surprise ``k_tᵀ(v_t − k_t W_ref)``
acts on each column alone). The device's transform ``[S; M] ↦ A [S; M] + b`` (``A``
``[2K, 2K]``) comes from ONE run of the rule with the state widened by ``2K`` columns
(the identity in the ``S`` and the ``M`` part, zero values there; ``θ`` rescaled so that
the loss's ``1/V`` is unchanged) — the delta rule's trick (docs/context_parallel.md).

LaCT with packed documents (``cu_seqlens``, a fresh call: the packed training path): chunks
restart at every document's start, so device boundaries fall inside chunks. The document
crossing into a device continues from the cache the single-device layer holds after the
device's first token minus one — the state before its current chunk (combined) and that chunk's
1 … C tokens so far (a halo) — and the layer's packed chunk scan runs once per device
(:func:`_lact_packed_apply`); any slice length works. Titans (linear memory) likewise, from
``(S, M)`` at the crossing document's last TTT-batch boundary plus its batch tokens so far: one
widened run of the layer's packed stream gives the transform and, as coefficients of the
incoming state, the outputs and caches (:func:`_titans_packed_apply`). Both packed forms also
continue a per-document cache (LaCT without the window branch): every document from its own
entry (state and its ``buf_len`` buffered tokens), the crossing document's current chunk /
batch beginning in its cache's buffer when it has fewer tokens on the earlier devices than
the segment so far; a LaCT document starting on a device hands on the cache's momentum
decayed by its updated chunks' ``ᾱ`` plus its ``X`` (buffered tokens included).

Unaligned unpacked slices on a fresh call (``T_local`` not a multiple of the chunk / TTT
batch, so segments straddle devices): an unpacked row is a packed row holding one document,
so every row runs the packed combined form with the global offsets ``[0, P·L]`` (``vmap`` over
the ``B`` rows inside ``shard_map``, :func:`_rows_as_documents`); the one-document caches,
stacked, are the unpacked cache ``[B, ...]`` the single-device call returns.

When the combined form applies (:func:`combine_reason` is ``None``): a fresh sequence
(``cache=None``, the training path), for any ``T_local`` (aligned slices run the rule's own
parallel form per device; unaligned ones the packed form, one document per row); a cache at a
segment boundary (:func:`cache_at_boundary`, checked at run time) with the slice aligned to
the layer's segments (LaCT: ``T_local`` a multiple of ``chunk_size``; Titans: of
``batch_size``); packed documents (any ``T_local``) on a fresh call or continuing a cache
(LaCT: without the window branch). Otherwise the layer runs pipelined (LaCT with the window
branch on packed documents continuing a cache, an unaligned unpacked slice continuing a
cache).
Gradients: plain autodiff through the collectives
(``all_gather``); Titans' transform (step 1–2) is rematerialised in the backward pass.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tttla_jax.parallel import context as _ctx
from tttla_jax.parallel.ops import _carry_in, _compose
from tttla_jax.rules.lact.parallel import parallel_form


def _kind(mixer) -> Optional[str]:
    from tttla_jax.nn.lact import LaCTLayer
    from tttla_jax.nn.titans import TitansMemory
    if isinstance(mixer, LaCTLayer):
        return "lact"
    if isinstance(mixer, TitansMemory):
        return "titans"
    return None


def combine_reason(mixer, local_len: Optional[int] = None, *, cache=None, cu_seqlens=None) -> Optional[str]:
    """``None`` if ``mixer`` runs the associative combined form under sequence parallelism
    for a call on ``local_len`` tokens per device (``None``: any aligned length) with this
    ``cache`` / ``cu_seqlens``; else why it runs pipelined (a sentence). A fresh call
    (``cache=None``) runs combined for any ``local_len``: slices aligned to the layer's
    segments (LaCT ``chunk_size``, Titans ``batch_size``) with the rule's parallel form per
    device, unaligned ones with every row as one packed document. A call with a cache runs
    combined when ``local_len`` is aligned and the cache sits at a segment boundary
    (:func:`cache_at_boundary`, decided at run time by a ``lax.cond``), else pipelined. Packed
    documents (``cu_seqlens``) run combined for any ``local_len``, on a fresh call or
    continuing a cache (LaCT with the window branch then runs pipelined)."""
    kind = _kind(mixer)
    if kind is None:
        return f"{type(mixer).__name__}: no combined form (LaCT and Titans layers only)"
    packed = cu_seqlens is not None
    if packed and cache is not None and kind == "lact" and mixer.window is not None:
        return ("LaCT with a window branch: packed documents (cu_seqlens) continuing a cache run "
                "pipelined (each document's cached keys would cross devices)")
    if kind == "lact":
        rule = mixer.rule
        why = rule.breaks_associativity()
        if why is not None:
            return f"LaCT preset {mixer.preset!r}: {why}"
        if rule.order != "apply_then_update":
            return f"LaCT order={rule.order!r}: the cache resumes apply-then-update only"
        if rule.q_is_k:
            return "LaCT q_is_k: runs pipelined"
        seg, what = rule.chunk_size, "chunk_size"
    else:
        if mixer.memory != "linear":
            return ("Titans memory='mlp': the first layer's features act(k W1) depend on the state "
                    "(not affine in it)")
        seg, what = mixer.batch_size, "batch_size"
    if local_len is not None and local_len % seg and not packed and cache is not None:
        return (f"a cache continued on {local_len} tokens per device, not a multiple of "
                f"{what} = {seg}: runs pipelined")
    return None


def cache_at_boundary(mixer, cache) -> jax.Array:
    """Whether the combined form can continue ``cache`` (a traced bool, the same on every
    device since the cache is): every row at a segment boundary. Titans: the TTT-batch buffer
    is empty (``buf_len`` 0). LaCT: the chunk buffer is empty (``buf_len`` 0: a fresh row,
    ``W^(0)``) or holds a whole chunk (``buf_len = C``: its pending update is applied first,
    then the new tokens start a chunk); ``1 … C − 1`` buffered tokens would shift every chunk
    off the device boundaries."""
    n = cache["buf_len"]
    if _kind(mixer) == "lact":
        return jnp.all((n == 0) | (n == mixer.rule.chunk_size))
    return jnp.all(n == 0)


def combined_apply(mixer, x, *, positions=None, axis_name: Optional[str] = None, cache=None,
                   cu_seqlens=None):
    """The combined form of a LaCT (V2–V6) or Titans (linear memory) layer on this device's
    slice ``x`` ``[B, T_local, W]`` of a fresh sequence (call inside ``shard_map``; an
    unaligned ``T_local`` runs every row as one packed document, :func:`_rows_as_documents`), or of one
    continuing a ``cache`` at a segment boundary (:func:`cache_at_boundary`; not checked here,
    see :func:`tttla_jax.parallel.context.sequence_parallel_call`). Titans: the cache's memory
    and momentum enter device 0. LaCT: a row with a whole buffered chunk (``buf_len = C``)
    first applies that chunk's pending update to the cache's state
    (``LaCTRule.chunk_update``), a row with ``buf_len`` 0 starts from ``W^(0)``; positions
    continue ``cache["pos"]``, the window branch's halo starts from the cache's keys and
    values. Both: the cache's conv taps are the halo's start.

    Returns ``(y [B, T_local, W], cache)``: this slice of the single-device output and the
    cache after the last global token (the same on every device).

    Raises:
      ValueError: :func:`combine_reason` is not ``None`` (the reason).
    """
    from flax import nnx
    axis = _ctx._resolve_axis(axis_name, "combined_apply")
    B, L = x.shape[0], x.shape[1]
    why = combine_reason(mixer, L, cache=cache, cu_seqlens=cu_seqlens)
    if why is not None:
        raise ValueError(f"combined_apply: {why}")
    off = _ctx.shard_offset(L, axis)
    packed = cu_seqlens is not None
    if packed:
        NB = _ctx._check_global_cu(cu_seqlens, B, L, axis)
    elif positions is None:
        start = (mixer.init_cache(B) if cache is None else cache).get(
            "pos", jnp.zeros((B,), jnp.int32))  # Titans has no positions
        positions = start[:, None] + off + jnp.arange(L, dtype=jnp.int32)[None]
    if positions is not None:
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (B, L))
    graphdef, state = nnx.split(mixer)
    axes = frozenset({axis}).union(*(_ctx._vma(a) for a in jax.tree.leaves((x, state, positions))))
    state = jax.tree.map(lambda a: _ctx._varying(a, axes), state)
    x = _ctx._varying(x, axes)
    if positions is not None:
        positions = _ctx._varying(positions, axes)
    m = nnx.merge(graphdef, state)
    c0 = jax.tree.map(lambda a: _ctx._varying(jnp.asarray(a), axes),
                      m.init_cache(NB if packed else B) if cache is None else cache)
    if not packed and cache is None and L % _segment(mixer):
        return _rows_as_documents(m, x, positions, c0, axis)
    if packed and _kind(mixer) == "lact":
        return _lact_packed_apply(m, x, positions, c0, cu_seqlens, axis, given=cache is not None)
    if packed:
        return _titans_packed_apply(m, x, c0, cu_seqlens, axis)
    if _kind(mixer) == "lact":
        return _lact_apply(m, x, positions, c0, axis, given=cache is not None)
    return _titans_apply(m, x, positions, c0, axis)


# ------------------------------------------------------------------------------- helpers

def _segment(mixer) -> int:
    """The layer's segment: LaCT's ``chunk_size``, Titans' ``batch_size``."""
    return mixer.rule.chunk_size if _kind(mixer) == "lact" else mixer.batch_size


def _rows_as_documents(mixer, x, positions, c0, axis):
    """A fresh unpacked call whose slices are not aligned to the layer's segments: every row is
    one packed document spanning the whole sequence (global offsets ``[0, P·L]``), run by the
    packed combined form (:func:`_lact_packed_apply` / :func:`_titans_packed_apply`, ``vmap``-ed
    over the ``B`` rows); the one-document caches stacked are the unpacked cache ``[B, ...]``."""
    L = x.shape[1]
    cu = jnp.asarray([0, _ctx.axis_size(axis) * L], jnp.int32)
    one = jax.tree.map(lambda a: a[:1], c0)                       # a fresh one-document cache

    def row(xr, pr):
        if _kind(mixer) == "lact":
            y, c = _lact_packed_apply(mixer, xr[None], pr[None], one, cu, axis)
        else:
            y, c = _titans_packed_apply(mixer, xr[None], one, cu, axis)
        return y[0], jax.tree.map(lambda a: a[0], c)

    return jax.vmap(row)(x, positions)


def _halo_rows(a, start, axis):
    """:func:`context.halo` for ``[B, T, ...]`` rows with the start ``[B, K, ...]`` (any trailing dims)."""
    B, T = a.shape[:2]
    K = start.shape[1]
    flat = _ctx.halo(a.reshape(B, T, -1), start.reshape(B, K, -1), axis)
    return flat.reshape(start.shape)


def _exclusive_sum(d, axis):
    """``Σ_{q<p} d_q`` on device ``p`` (an all-gather and a masked sum over the devices)."""
    P = _ctx.axis_size(axis)
    g = lax.all_gather(d, axis)                                   # [P, ...]
    before = jnp.arange(P) < lax.axis_index(axis)
    return jnp.sum(jnp.where(before.reshape((P,) + (1,) * d.ndim), g, 0), axis=0)


# ---------------------------------------------------------------------------------- LaCT

def _lact_carry(xin, axis):
    """LaCT (V2–V6): the ``carry`` of :func:`tttla_jax.rules.lact.parallel.parallel_form` on
    this device — the momentum entering it (the momentum transforms ``M ↦ ᾱ M + X`` of the
    earlier devices composed over the device axis, applied to the start momentum) and the W1
    entering it (the start W1 plus the earlier devices' summed chunk updates)."""
    p = lax.axis_index(axis)
    st = xin.state

    def momentum_in(A, X):
        M0 = st.mom[1]
        Ag, Xg = lax.all_gather((A, X), axis)                     # [P, B, H], [P, B, H, dv, dh]
        Ac, Xc = lax.associative_scan(_compose(False), (Ag, Xg), axis=0)
        i = jnp.maximum(p - 1, 0)
        a = lax.dynamic_index_in_dim(Ac, i, 0, keepdims=False)
        x = lax.dynamic_index_in_dim(Xc, i, 0, keepdims=False)
        return jnp.where(p > 0, a[..., None, None] * M0 + x, M0)

    def w1_in(U_sum):
        return st.w[1] + _exclusive_sum(U_sum, axis)

    return momentum_in, w1_in


def _lact_start(mixer, c0, st0):
    """The LaCT state the new tokens start from, continuing the cache ``c0`` at a chunk
    boundary: per row, ``W^(0)`` (``st0``) where ``buf_len`` is 0, and where it is ``C`` the
    cache's state after the buffered chunk's pending update (``LaCTRule.chunk_update`` on the
    buffered keys, values, learning rates and momentum — as the single-device stream does)."""
    from tttla_jax.rules.lact import LaCTState
    rule = mixer.rule
    sd = mixer._state_dtype()
    B = c0["buf_len"].shape[0]
    full = c0["buf_len"] == rule.chunk_size                        # [B]
    pick = lambda p, key: None if p is None else c0[key].astype(sd)  # noqa: E731
    st = LaCTState(w=tuple(pick(p, f"w{i}") for i, p in enumerate(st0.w)),
                   main=None if st0.main is None else tuple(pick(p, f"main{i}") for i, p in enumerate(st0.main)),
                   mom=None if st0.mom is None else tuple(pick(p, f"mom{i}") for i, p in enumerate(st0.mom)),
                   norm=st0.norm)
    bk, bv = c0["buf_k"], c0["buf_v"]
    xb = rule.prepare(bk, bk, bv, c0.get("buf_lr"), st, c0.get("buf_m"))  # one whole chunk
    hc = lambda a: jnp.moveaxis(a, 1, 2)                           # noqa: E731  [B, C, H, ·] -> [B, H, C, ·]
    new = rule.chunk_update(xb.state, hc(xb.k), hc(xb.v), tuple(hc(a) for a in xb.lrs),
                            xb.chunk_momentum[..., 0])
    sel = lambda a, b: jnp.where(full.reshape((B,) + (1,) * (a.ndim - 1)), a, b.astype(a.dtype))  # noqa: E731
    return jax.tree.map(sel, new, st0)


def _lact_apply(mixer, x, positions, c0, axis, given=False):
    """LaCT (V2–V6) on this device: projections (conv halo-aware), the combined incoming
    state (``given``: continuing the cache ``c0`` at a chunk boundary, :func:`_lact_start`),
    the rule's own parallel form from it, the window branch from its halo, the head."""
    from tttla_jax.nn.mixers import sliding_window_attend
    rule = mixer.rule
    B, L = x.shape[:2]
    C = rule.chunk_size
    H, D = mixer.num_heads, mixer.head_dim
    conv_cache = {}
    fq, fk, fv, lr, m, attn = mixer._project(x, positions, c0, conv_cache, None)  # conv: halo-aware here
    st0 = rule.init_state(*mixer._fast_params(), B)
    if given:
        st0 = _lact_start(mixer, c0, st0)
    # the rule's associative parallel form with the device carry: every chunk's NS5 once
    xin = rule.prepare(fq, fk, fv, lr, st0, m)
    o, w1, mom1 = parallel_form(rule, xin, "associative", carry=_lact_carry(xin, axis))
    s0 = xin.state
    st = s0._replace(w=(s0.w[0], w1, s0.w[2]),
                     mom=(None, mom1, None) if rule.use_momentum else s0.mom)
    # as the layer's fresh call: the state before the last chunk, that chunk buffered
    last = lambda a: None if a is None else a[:, L - C:]          # noqa: E731
    cache = {**mixer._state_to_cache(st), **mixer._buffers(last(fk), last(fv), last(lr), last(m)),
             "buf_len": jnp.full((B,), C, jnp.int32), "pos": positions[:, -1] + 1}
    o = o.astype(fv.dtype).astype(mixer._act_dtype())
    if mixer.ttt_norm is not None:
        o = mixer.ttt_norm(o)
    if mixer.output_gate:
        gate = jax.nn.silu(mixer.ttt_scale_proj(x))                # [B, T, H]
        o = o * gate[..., None].astype(o.dtype)
    o = o.reshape(B, L, H * D)
    if mixer.window is not None:
        qa, ka, va = attn
        sub = {"k": _halo_rows(ka, c0["attn_k"], axis), "v": _halo_rows(va, c0["attn_v"], axis),
               "kpos": _halo_rows(positions[..., None], c0["attn_kpos"][..., None], axis)[..., 0]}
        oa, sub = sliding_window_attend(qa, ka, va, positions, sub, window=mixer.window)
        o = o + oa.reshape(B, L, H * D).astype(o.dtype)
        cache.update(attn_k=sub["k"], attn_v=sub["v"], attn_kpos=sub["kpos"])
    cache = _ctx.from_last_shard(cache, axis)
    cache.update(conv_cache)                                       # already the global final taps
    return mixer.o_proj(o), cache


# ------------------------------------------------------------------ LaCT, packed documents

def _lact_packed_apply(mixer, x, positions, c0, cu, axis, given=False):
    """LaCT (V2–V6) on this device's slice ``x`` ``[1, L, W]`` of N packed documents (global
    ``cu`` ``[N + 1]``; a fresh call, or ``given``: continuing the per-document cache ``c0``,
    no window branch — each stream then starts with its entry's buffered tokens, see
    docs/context_parallel.md): the combined form across devices.

    Chunks restart at every document's start, so a device boundary generally falls inside a
    chunk. The document crossing into device ``p`` continues from the cache the single-device
    layer would hold after token ``p·L − 1``: the state before that document's last chunk so
    far (from the combine) and that chunk's ``h ∈ 1 … C`` tokens as its buffer (a halo of the
    earlier devices' keys, values, learning rates and momentum gates). Those ``h`` tokens were
    read on the earlier devices, with the same state (a partial last chunk is apply-only), and
    the first chunk here is completed with them, so every chunk's update is formed on the
    device holding its end. Then the layer's own packed chunk scan runs once on the slice
    (:meth:`LaCTLayer._packed`), every other document from ``W^(0)``.

    The state handed on — of the document holding the device's last token — is
    ``(M, W1) ↦ (A M + X, a W1 + b)``: ``a = A = 0`` when that document starts on the device
    (a reset), else ``A = Π ᾱ_j`` over its updating chunks here, ``X = Σ_j (Π_{i>j} ᾱ_i) G_j``
    (``G_j = ±Σ_{t∈j} lr1_t v_tᵀ φ(k_t)``: one product over the tokens) and ``a = 1``. The
    momentum maps combine first (all-gather + associative scan); the chunk scan then runs from
    the exact incoming momentum with ``W1 = 0`` for the crossing document, which gives
    ``b = Σ_j NS5(M_j)`` and its outputs without the incoming ``W1``. Since ``φ`` is static,
    the outputs are linear in ``W1``: after the second combine (of the ``(a, b)`` pairs) the
    crossing document's tokens add ``φ(q_t) W1_inᵀ``. Final caches come from the device
    holding each document's last token."""
    from tttla_jax.nn._segments import _seq_of, packed_next_pos, packed_positions
    from tttla_jax.rules.lact import LaCTState
    from tttla_jax.rules.lact.fastnet import features
    rule = mixer.rule
    L = x.shape[1]
    C = rule.chunk_size
    H, D = mixer.num_heads, mixer.head_dim
    sd = mixer._state_dtype()
    N = _ctx._check_global_cu(cu, 1, L, axis)
    cu = jnp.asarray(cu, jnp.int32)
    p = lax.axis_index(axis).astype(jnp.int32)
    off = p * jnp.int32(L)
    positions = packed_positions(positions, c0["pos"], cu, L)      # restart per document (global)
    conv_cache = {}
    fq, fk, fv, lr, m, attn = mixer._project(x, positions, c0, conv_cache, cu)  # conv: halo by document
    # the document crossing into this device (holding tokens off − 1 and off) and its buffer length
    d = _seq_of(cu, off - 1, N)
    cross_in = (p > 0) & (cu[d + 1] > off)
    # (given: continuing the per-document cache c0, whose buf_len buffered tokens start each
    # document's stream; a current chunk that began in the buffer takes its first na rows there)
    n_all = c0["buf_len"].astype(jnp.int32) if given else jnp.zeros((N,), jnp.int32)
    h = jnp.where(cross_in, jnp.mod(n_all[d] + off - cu[d] - 1, C) + 1, 0)
    na = jnp.where(cross_in, jnp.maximum(h - (off - cu[d]), 0), 0)
    # halo: the C rows before the slice of (k, v, lr, m)
    parts = [fk.reshape(1, L, H * D), fv.reshape(1, L, H * D)]
    if lr is not None:
        parts.append(lr.reshape(1, L, H * 3))
    if m is not None:
        parts.append(m.reshape(1, L, H))
    feat = jnp.concatenate([a.astype(sd) for a in parts], axis=-1)
    hal = _ctx.halo(feat, jnp.zeros((1, C, feat.shape[-1]), sd), axis)            # [1, C, F]
    ext = jnp.concatenate([hal, feat], axis=1)                                     # [1, C + L, F]
    sizes = [H * D, H * D] + ([H * 3] if lr is not None else []) + ([H] if m is not None else [])
    split = lambda a: jnp.split(a, np.cumsum(sizes)[:-1].tolist(), axis=-1)  # noqa: E731
    bufd = lax.dynamic_slice_in_dim(jnp.concatenate([hal, jnp.zeros_like(hal)], axis=1), C - h, C, 1)
    if given:  # the cache's buffered rows, in the halo's layout [N, C, F]
        names = ["buf_k", "buf_v"] + (["buf_lr"] if lr is not None else []) + (["buf_m"] if m is not None else [])
        crow = jnp.concatenate([c0[k].reshape(N, C, -1).astype(sd) for k in names], axis=-1)
        bufd = jnp.where((jnp.arange(C) < na)[None, :, None], crow[d][None], bufd)
    buf = split(bufd)
    buf_k, buf_v = buf[0].reshape(1, C, H, D), buf[1].reshape(1, C, H, D)
    buf_lr = buf[2].reshape(1, C, H, 3) if lr is not None else None
    buf_m = buf[-1].reshape(1, C, H) if m is not None else None
    st0 = rule.init_state(*mixer._fast_params(), 1)

    def doc_w(q):
        """Document ``q``'s static fast weights (φ's W0, W2; W1 unused): ``W^(0)``, or continuing
        a cache entry with ``buf_len > 0``, that entry's (as the single-device packed call)."""
        if not given:
            return st0.w
        return tuple(None if w is None else jnp.where(n_all[q] == 0, w, c0[f"w{i}"][q][None].astype(w.dtype))
                     for i, w in enumerate(st0.w))

    # the document holding the device's last token: its stream here (ext coordinates) and updates
    e = _seq_of(cu, off + L - 1, N)
    cont = cross_in & (e == d)
    s0 = jnp.where(cont, C - h, C + cu[e] - off - n_all[e])          # a reset: its buffered rows first
    if given:  # the stream's rows that come from the cache's buffer (ext coordinates s0 …)
        cnt = jnp.where(cont, na, n_all[e])
        i = jnp.arange(C + L, dtype=jnp.int32)
        fromc = (i >= s0) & (i < s0 + cnt)
        ext = jnp.where(fromc[None, :, None], crow[e][jnp.clip(i - s0, 0, C - 1)][None], ext)
    R = C + L - s0
    nu = (R + C - 1) // C - 1                                       # updating chunks of the stream
    Jmax = (C + L) // C + 1
    s = jnp.arange(C + L, dtype=jnp.int32) - s0
    j = jnp.where(s >= 0, s // C, Jmax)
    upd = (s >= 0) & (j < nu)                                       # [C + L]
    mom_in = None
    if rule.use_momentum:
        ek = ext[..., :H * D].reshape(1, C + L, H, D)
        ev = ext[..., H * D:2 * H * D].reshape(1, C + L, H, D)
        elr = ext[..., 2 * H * D:2 * H * D + 3 * H].reshape(1, C + L, H, 3) if lr is not None else None
        em = ext[..., -H:]                                          # [1, C + L, H]
        xi = rule.prepare(ek, ek, ev, elr, st0._replace(w=doc_w(e)), em)
        jj = jnp.where(upd, j, Jmax)
        msum = jax.ops.segment_sum(jnp.where(upd[:, None], em[0], 0), jj, num_segments=Jmax + 1)[:Jmax]
        abar = jnp.where((jnp.arange(Jmax) < nu)[:, None], msum / C, 1)             # [Jmax, H]
        incl = jnp.flip(jnp.cumprod(jnp.flip(abar, 0), axis=0), 0)                  # Π_{i ≥ j}
        after = jnp.concatenate([incl[1:], jnp.ones_like(incl[:1])], axis=0)        # Π_{i > j}
        sign = 1.0 if rule.ascent else -1.0
        coef = jnp.where(upd[:, None], after[jnp.minimum(j, Jmax - 1)], 0) * sign    # [C + L, H]
        pk = xi.lrs[1][0] * jnp.moveaxis(features(xi.state.w, jnp.moveaxis(xi.k, 1, 2), rule.fast_net)[0], 1, 0)
        X = jnp.einsum("th,thv,thd->hvd", coef, xi.v[0], pk)[None]                  # [1, H, dv, dh]
        if given:  # a reset continues the cache's momentum (W^(0)'s for a fresh entry, buf_len 0)
            M_e = jnp.where(n_all[e] == 0, st0.mom[1][0].astype(sd), c0["mom1"][e].astype(sd))
            X = X + jnp.where(cont, 0, incl[0][:, None, None] * M_e)[None]
        A = jnp.where(cont, incl[0], 0)[None]                                        # [1, H]
        mom_in = _carry_in(A, X, axis, p, matrix=False)             # momentum entering this device
    # the per-document caches: the crossing document continues (W1 = 0 for now), the others fresh
    fc = {key: val for key, val in c0.items()
          if key not in ("pos",) and not key.startswith(("attn_", "conv_"))}
    at_d = (jnp.arange(N) == d) & cross_in                          # [N]
    put = lambda a, val: jnp.where(at_d.reshape((N,) + (1,) * (a.ndim - 1)), val.astype(a.dtype), a)  # noqa: E731
    for i, w in enumerate(doc_w(d)):
        if w is not None:
            fc[f"w{i}"] = put(fc[f"w{i}"], jnp.zeros_like(w) if i == 1 else w)
    if mom_in is not None:
        fc["mom1"] = put(fc["mom1"], mom_in)
    fc["buf_k"], fc["buf_v"] = put(fc["buf_k"], buf_k), put(fc["buf_v"], buf_v)
    if buf_lr is not None:
        fc["buf_lr"] = put(fc["buf_lr"], buf_lr)
    if buf_m is not None:
        fc["buf_m"] = put(fc["buf_m"], buf_m)
    fc["buf_len"] = jnp.where(at_d, h, fc["buf_len"])
    local_cu = jnp.clip(cu - off, 0, L)
    o, new_fc = mixer._packed(fq, fk, fv, lr, m, fc, local_cu, True)
    # W1 handed on: a W1_in + b; the incoming W1 from the combine
    b = new_fc["w1"][e][None].astype(sd)
    w1_in = _carry_in(jnp.where(cont, 1.0, 0.0).astype(sd) * jnp.ones((1, H), sd), b, axis, p, matrix=False)
    # the crossing document's tokens read the incoming W1 too (the read is linear in W1)
    ws = tuple(None if w is None else w.astype(sd) for w in doc_w(d))
    corr = rule.read(LaCTState(w=(ws[0], w1_in, ws[2])), jnp.moveaxis(fq.astype(sd), 1, 2))  # [1, H, L, dv]
    mine = cross_in & (jnp.arange(L) < cu[d + 1] - off)              # [L]
    o = o + jnp.where(mine[None, :, None, None], jnp.moveaxis(corr, 1, 2), 0).astype(o.dtype)
    new_fc["w1"] = put(new_fc["w1"], new_fc["w1"][d] + w1_in[0].astype(new_fc["w1"].dtype))
    # every document's final cache from the device holding its last token
    cache = {**_from_owner(new_fc, cu, L, axis),
             **_from_first({"pos": packed_next_pos(positions, c0["pos"], cu), **conv_cache}, axis)}
    o = o.astype(mixer._act_dtype())
    if mixer.ttt_norm is not None:
        o = mixer.ttt_norm(o)
    if mixer.output_gate:
        gate = jax.nn.silu(mixer.ttt_scale_proj(x))                # [1, L, H]
        o = o * gate[..., None].astype(o.dtype)
    o = o.reshape(1, L, H * D)
    if mixer.window is not None:
        o, sub = _window_packed(mixer, attn, positions, c0, cu, axis, o)
        cache.update(sub)
    return mixer.o_proj(o), cache


def _window_packed(mixer, attn, positions, c0, cu, axis, o):
    """The window branch of packed documents on this device: the slice's queries attend over
    ``[halo ; slice]`` (the ``window`` rows before the slice, from the earlier devices) with a
    document mask; each document's cache from the device holding its last token."""
    from tttla_jax.nn.mixers import sliding_window_attend_packed
    qa, ka, va = attn
    _, L, Ha, Da = qa.shape
    w = mixer.window
    N = cu.shape[0] - 1
    off = lax.axis_index(axis).astype(jnp.int32) * jnp.int32(L)
    hk = _halo_rows(ka, jnp.zeros((1, w, Ha, Da), ka.dtype), axis)
    hv = _halo_rows(va, jnp.zeros((1, w, Ha, Da), va.dtype), axis)
    hp = _halo_rows(positions[..., None], jnp.full((1, w, 1), -1, jnp.int32), axis)[..., 0]
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)             # noqa: E731
    # a dummy document 0 holds the halo rows before every real document (before token 0)
    ext_cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.clip(cu - off + w, 0, w + L)])
    sub = {"k": c0["attn_k"][:1], "v": c0["attn_v"][:1], "kpos": c0["attn_kpos"][:1]}
    with _ctx.sequence_parallel(None):
        oa, new = sliding_window_attend_packed(cat(jnp.zeros_like(hk), qa), cat(hk, ka), cat(hv, va),
                                               cat(hp, positions), sub, window=w, cu_seqlens=ext_cu,
                                               fresh=True)
    o = o + oa[:, w:].reshape(1, L, Ha * Da).astype(o.dtype)
    nonempty = (cu[1:] > cu[:-1]).reshape((N, 1))
    out = {name: jnp.where(nonempty.reshape((N,) + (1,) * (c0[name].ndim - 1)),
                           new[key][1:].astype(c0[name].dtype), c0[name])   # an empty document: as it was
           for key, name in (("k", "attn_k"), ("v", "attn_v"), ("kpos", "attn_kpos"))}
    return o, _from_owner(out, cu, L, axis)


def _from_owner(tree, cu, L, axis):
    """Per-document cache entries ``[N, ...]`` as held by the device holding each document's
    last token (an empty document: device 0's, the same everywhere), on every device (a masked
    ``psum``)."""
    p = lax.axis_index(axis)
    off = p.astype(jnp.int32) * jnp.int32(L)
    nonempty = cu[1:] > cu[:-1]
    last = cu[1:] - 1 - off
    owner = jnp.where(nonempty, (last >= 0) & (last < L), p == 0)

    def one(a):
        sel = owner.reshape((-1,) + (1,) * (a.ndim - 1))
        return lax.psum(jnp.where(sel, a, jnp.zeros_like(a)), axis)

    return jax.tree.map(one, tree)


def _from_first(tree, axis):
    """Leaves that are the same on every device, typed so (device 0's, by a masked ``psum``)."""
    first = lax.axis_index(axis) == 0
    return jax.tree.map(lambda a: lax.psum(jnp.where(first, a, jnp.zeros_like(a)), axis), tree)


# -------------------------------------------------------------------------------- Titans

def _titans_transform(rule, impl, q, k, v, theta, eta, alpha, M0, S0, axis):
    """Titans (linear memory): ``(S, M)`` entering this device, from every device's affine
    transform ``[S; M] ↦ A [S; M] + b`` (one widened-state rule run, module doc)."""
    from tttla_jax.rules.titans import TitansState
    B, L, H, D = q.shape
    sd = M0.dtype
    p = lax.axis_index(axis)
    first = p == 0
    eye = jnp.broadcast_to(jnp.eye(D, dtype=sd), (B, H, D, D))
    zero = jnp.zeros_like(eye)
    # widened state: columns [b | from M = I | from S = I]; device 0's first block starts from
    # the global start state, so its offset already includes it
    Mw = jnp.concatenate([jnp.where(first, M0, 0), eye, zero], axis=-1)
    Sw = jnp.concatenate([jnp.where(first, S0, 0), zero, eye], axis=-1)
    vw = jnp.concatenate([v.astype(sd), jnp.zeros((B, L, H, 2 * D), sd)], axis=-1)
    thw = theta * 3.0                       # the inner loss's 1/V with V → 3V
    _, st = rule(q, k, vw, thw, eta, alpha, TitansState(Mw, Sw), impl=impl)
    Mo, So = st.memory, st.momentum                                # [B, H, D, 3D]
    blk = lambda a, i: a[..., i * D:(i + 1) * D]                   # noqa: E731
    A = jnp.concatenate([jnp.concatenate([blk(So, 2), blk(So, 1)], -1),
                         jnp.concatenate([blk(Mo, 2), blk(Mo, 1)], -1)], -2)   # [B, H, 2D, 2D] on [S; M]
    b = jnp.concatenate([blk(So, 0), blk(Mo, 0)], -2)             # [B, H, 2D, D]
    E = _carry_in(A, b, axis, p, matrix=True)                      # state after the earlier devices
    return TitansState(jnp.where(first, M0, E[..., D:, :]), jnp.where(first, S0, E[..., :D, :]))


def _titans_apply(mixer, x, positions, c0, axis):
    """Titans (linear memory) on this device: the layer's rule inputs (conv halo-aware), the
    combined incoming ``(S, M)`` (a TTT-batch boundary: nothing buffered), the rule from it."""
    B, L = x.shape[:2]
    H, D, c = mixer.num_heads, mixer.head_dim, mixer.chunk_size
    conv_cache = {}
    # the layer's rule inputs (TitansMemory.__call__ on a fresh sequence)
    q, k, v = mixer._recipe_qkv(mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x), c0, conv_cache,
                                B, L, H, D, None)
    sd = c0["buf_theta"].dtype
    theta = mixer.max_lr * jax.nn.sigmoid(mixer.theta_proj(x).astype(sd))
    N = L // c

    def pool(a):  # [B, L, H] -> [B, H, N]: chunk means
        return jnp.moveaxis(jnp.mean(a.reshape(B, N, c, H), axis=2), 1, 2)

    eta = jax.nn.sigmoid(pool(mixer.eta_proj(x).astype(sd)))
    alpha = jax.nn.sigmoid(pool(mixer.alpha_proj(x).astype(sd)))
    rule = mixer._rule()
    impl = rule.resolve_impl(mixer.impl)
    st_in = jax.checkpoint(lambda *a: _titans_transform(rule, impl, *a, axis))(
        q, k, v, theta, eta, alpha, c0["memory"].astype(sd), c0["momentum"].astype(sd))
    o, st = rule(q, k, v, theta, eta, alpha, st_in, impl=impl)
    cache = {key: val for key, val in c0.items()}                  # empty buffers: a batch boundary
    cache["memory"] = st.memory.astype(c0["memory"].dtype)
    cache["momentum"] = st.momentum.astype(c0["momentum"].dtype)
    cache = _ctx.from_last_shard({key: val for key, val in cache.items() if key not in conv_cache}, axis)
    cache.update(conv_cache)
    o = mixer._recipe_out(o.astype(mixer._act_dtype())).reshape(B, L, H * D)
    return mixer.o_proj(o), cache


def _titans_packed_apply(mixer, x, c0, cu, axis):
    """Titans (linear memory) on this device's slice ``x`` ``[1, L, W]`` of N packed
    documents (global ``cu`` ``[N + 1]``; a fresh call, or continuing the per-document cache
    ``c0``): the combined form across devices.

    The document crossing into device ``p`` continues from the cache the single-device layer
    holds after token ``p·L − 1``: ``(S, M)`` at its last TTT-batch boundary (from the combine)
    and the ``h ∈ 0 … batch_size − 1`` tokens of its current batch so far (a halo of the
    earlier devices' q, k, v, θ and gate projections; with a cache, ``h`` counts the document's
    ``buf_len`` buffered tokens too, and a batch that began in the cache's buffer takes its
    first ``buf_len`` rows from there). Every other document continues from its cache entry. Everything the device computes is affine
    in that incoming ``(S, M)``, so ONE run of the layer's packed stream
    (:func:`tttla_jax.nn._segments.run_segments_packed`) with the state widened by ``2K``
    columns (the crossing document's columns start from ``[0 | I | 0]`` / ``[0 | 0 | I]``, every
    other document's from ``[W_0 | 0 | 0]`` / ``0``; zero values there, ``θ`` × 3 so that the
    loss's ``1/V`` is unchanged) gives the device's transform ``[S; M] ↦ A [S; M] + b`` (a reset,
    ``A = 0``, when the document holding the last token starts on the device) and, as
    coefficients of the incoming state, its outputs and final caches: after the combine,
    ``o_t = o⁰_t + (q_t A_MM) M_in + (q_t A_MS) S_in``."""
    from tttla_jax.nn._segments import _seq_of, run_segments_packed
    from tttla_jax.rules.titans import TitansState
    L = x.shape[1]
    H, D, c, Pb = mixer.num_heads, mixer.head_dim, mixer.chunk_size, mixer.batch_size
    N = _ctx._check_global_cu(cu, 1, L, axis)
    cu = jnp.asarray(cu, jnp.int32)
    p = lax.axis_index(axis).astype(jnp.int32)
    off = p * jnp.int32(L)
    conv_cache = {}
    q, k, v = mixer._recipe_qkv(mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x), c0, conv_cache,
                                1, L, H, D, cu)
    sd = c0["buf_theta"].dtype
    theta = mixer.max_lr * jax.nn.sigmoid(mixer.theta_proj(x).astype(sd))
    eta_pre, alpha_pre = mixer.eta_proj(x).astype(sd), mixer.alpha_proj(x).astype(sd)
    # the document crossing into this device and the tokens of its current TTT batch before it:
    # its cache's buf_len buffered tokens (a fresh call: none) and its tokens on earlier devices
    d = _seq_of(cu, off - 1, N)
    cross_in = (p > 0) & (cu[d + 1] > off)
    n_d = c0["buf_len"][d].astype(jnp.int32)
    h = jnp.where(cross_in, jnp.mod(n_d + off - cu[d], Pb), 0)
    na = jnp.maximum(h - (off - cu[d]), 0)     # > 0: the batch began in the cache's buffer (na = n_d)
    xs = (q, k, v, theta, eta_pre, alpha_pre)
    names = ("buf_q", "buf_k", "buf_v", "buf_theta", "buf_eta", "buf_alpha")
    bufs = []
    for a, name in zip(xs, names):
        old = c0[name]                                             # [N, Pb − 1, ...]
        if Pb == 1:
            bufs.append(old)
            continue
        flat = a.reshape(1, L, -1).astype(old.dtype)
        hal = _ctx.halo(flat, jnp.zeros((1, Pb - 1, flat.shape[-1]), old.dtype), axis)
        buf = lax.dynamic_slice_in_dim(jnp.concatenate([hal, jnp.zeros_like(hal)], axis=1), Pb - 1 - h, Pb - 1, 1)
        i = jnp.arange(Pb - 1)[None, :, None]
        own = old[d].reshape(1, Pb - 1, -1).astype(old.dtype)          # the crossing document's cache buffer
        buf = jnp.where(i < na, own, jnp.where(i < h, buf, 0)).reshape((1,) + old.shape[1:])
        at = ((jnp.arange(N) == d) & cross_in).reshape((N,) + (1,) * (old.ndim - 1))
        bufs.append(jnp.where(at, buf, old))
    at_d = ((jnp.arange(N) == d) & cross_in)[:, None, None, None]
    n = jnp.where(at_d[:, 0, 0, 0], h, c0["buf_len"])
    # the widened state: columns [own | from M = I | from S = I] (the crossing document only)
    M0, S0 = c0["memory"].astype(sd), c0["momentum"].astype(sd)   # [N, H, D, D]
    eye = jnp.broadcast_to(jnp.eye(D, dtype=sd), M0.shape)
    zero = jnp.zeros_like(M0)
    Mw = jnp.concatenate([jnp.where(at_d, 0, M0), jnp.where(at_d, eye, 0), zero], axis=-1)
    Sw = jnp.concatenate([jnp.where(at_d, 0, S0), zero, jnp.where(at_d, eye, 0)], axis=-1)
    wide = lambda a: jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (2 * D,), a.dtype)], axis=-1)  # noqa: E731
    xs = (q, k, wide(v.astype(sd)), theta * 3.0, eta_pre, alpha_pre)
    bufs[2], bufs[3] = wide(bufs[2].astype(sd)), bufs[3] * 3.0
    rule = mixer._rule()
    impl = rule.resolve_impl(mixer.impl)

    def step(st, seg):
        qs, ks, vs, th, ep, ap = seg
        Nc = -(-qs.shape[1] // c)

        def pool(a):  # [1, T, H] -> [1, H, Nc]: mean over each chunk (zero-padded at the end)
            a = jnp.pad(a, ((0, 0), (0, Nc * c - a.shape[1]), (0, 0)))
            return jnp.moveaxis(jnp.mean(a.reshape(1, Nc, c, H), axis=2), 1, 2)

        eta, alpha = jax.nn.sigmoid(pool(ep)), jax.nn.sigmoid(pool(ap))
        o, st2 = rule(qs, ks, vs, th, eta, alpha, st, impl=impl)
        return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), st2, st), o

    ow, stw, nbufs, nlen = run_segments_packed(step, TitansState(Mw, Sw), xs, tuple(bufs), n, Pb,
                                               jnp.clip(cu - off, 0, L))
    blk = lambda a, i: a[..., i * D:(i + 1) * D]                   # noqa: E731
    Mo, So = stw.memory, stw.momentum                              # [N, H, D, 3D]
    # the state handed on: of the document holding the device's last token
    e = _seq_of(cu, off + L - 1, N)
    cont = (cross_in & (e == d)).astype(sd)
    A = jnp.concatenate([jnp.concatenate([blk(So[e], 2), blk(So[e], 1)], -1),
                         jnp.concatenate([blk(Mo[e], 2), blk(Mo[e], 1)], -1)], -2)[None] * cont
    b = jnp.concatenate([blk(So[e], 0), blk(Mo[e], 0)], -2)[None]  # [1, H, 2D, D]
    E = _carry_in(A, b, axis, p, matrix=True)
    S_in, M_in = E[..., :D, :], E[..., D:, :]                      # [1, H, D, D]
    o = blk(ow, 0) + jnp.einsum("bthk,bhkv->bthv", blk(ow, 1), M_in) + jnp.einsum("bthk,bhkv->bthv", blk(ow, 2), S_in)
    app = lambda W: (blk(W, 0) + jnp.einsum("nhkj,bhjv->nhkv", blk(W, 1), M_in)  # noqa: E731
                     + jnp.einsum("nhkj,bhjv->nhkv", blk(W, 2), S_in))
    cache = {"memory": app(Mo).astype(c0["memory"].dtype), "momentum": app(So).astype(c0["momentum"].dtype)}
    for name, nb in zip(names, nbufs):
        old = c0[name]
        nb = nb[..., :D] if name == "buf_v" else (nb / 3.0 if name == "buf_theta" else nb)
        cache[name] = nb.astype(old.dtype)
    cache["buf_len"] = nlen
    cache = _from_owner(cache, cu, L, axis)
    cache.update(_from_first(conv_cache, axis))
    o = mixer._recipe_out(o.astype(mixer._act_dtype())).reshape(1, L, H * D)
    return mixer.o_proj(o), cache

