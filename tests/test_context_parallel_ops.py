"""Sequence (context) parallelism of the ops (tttla_jax.parallel.ops) against the single-device ops.

Every case runs the sharded op (``sharded_linear_attention`` / ``sharded_delta_rule``, which call
the in-``shard_map`` functions) on a mesh whose ``"seq"`` axis has P devices and compares it with
``tt.linear_attention(..., masking="causal")`` / ``tt.delta_rule`` on one device through
:func:`tttla_jax.testing.check_equivalence`: outputs, final states and the gradients w.r.t. q, k, v,
log_decay, beta and initial_state, at 1e-10 in float64 (float32: the harness's 1e-4, relative to
each quantity's magnitude). T = 45 is not a multiple of P (the wrapper pads to 46 or 48), the local
slices hold several chunks (chunk_size 4), and the packed layout

    cu_seqlens = [0, 0, 5, 5, 30, 36, 36, 45]

has an empty first document, an empty document inside, a document (5…30) that spans 3 devices at
P = 4 (2 at P = 2, 5 at P = 8), documents ending exactly on a device boundary (36 at P = 4 and 8;
30 at P = 8) followed by an empty one, and the last document running into the padding. It is
passed as a jit argument, so the functions see a traced ``cu_seqlens``. Log-decays include ``-inf``
tokens (hard resets) inside a spanning document, one on a device's first token.

All multi-device cases run in one subprocess with ``--xla_force_host_platform_device_count=8``
(compilation dominates). The default suite runs P = 4 on packed documents for both ops (the
delta rule's state passes on token blocks of 4), the unpacked delta rule (its transform folded
into the local pass; groups of one chunk, so its states are stored for two blocks of two groups,
the last group of the last block all padding) and an unpacked linear
attention on a (data=2, seq=4) mesh with a traced query scale among the differentiated inputs
(its chunk-states-first form, which the script checks was taken); the sweep over P = 2, 4, 8,
packed and not, float32, the in-``shard_map`` call written by hand, batch axes for both ops,
linear attention without a log-decay, the token-block loops, the delta rule's state-only
passes on unpacked slices (``_DELTA_WIDENED`` off) and its widened pass storing a state every
1, 2 or 3 groups is ``slow``.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax import parallel as tp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import PartitionSpec as Ps
    import tttla_jax as tt
    from tttla_jax import parallel as tp
    from tttla_jax.testing import check_equivalence, random_inputs

    assert jax.device_count() == 8
    CU = [0, 0, 5, 5, 30, 36, 36, 45]
    T, H, K, V, C = 45, 2, 3, 4, 4

    def inputs(op, B, packed, dtype, seed, scale=False, decay=True):
        shapes = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V), "log_decay": (B, T, H)}
        if op == "delta":
            shapes["beta"] = (B, T, H)
        x = random_inputs(shapes, seed=seed, dtype=dtype,
                          kinds={"k": "unit", "log_decay": "logdecay", "beta": "rate"})
        g = np.array(x["log_decay"])
        g[0, 13, 0] = -np.inf   # a reset inside the document that spans devices
        g[0, 24, 1] = -np.inf   # a reset on a device's first token (P = 4, 8)
        x["log_decay"] = jnp.asarray(g, dtype)
        N = len(CU) - 1 if packed else B
        x["initial_state"] = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(N, H, K, V)), dtype)
        if packed:
            x["cu_seqlens"] = jnp.asarray(CU, jnp.int32)
        if not decay:  # no log-decay (the chunked form's path without decay terms)
            del x["log_decay"]
        if scale:  # a traced query scale, differentiated (its gradient summed over the devices)
            x["scale"] = jnp.asarray(0.37, dtype)
        return x

    def forms(op, mesh, batch_axes, by_hand):
        single = tt.delta_rule if op == "delta" else tt.linear_attention
        sharded = tp.sharded_delta_rule if op == "delta" else tp.sharded_linear_attention
        inside = tp.delta_rule if op == "delta" else tp.linear_attention

        def ref(q, k, v, initial_state, log_decay=None, beta=None, cu_seqlens=None, scale=None):
            gates = (beta,) if op == "delta" else ()
            return single(q, k, v, *gates, log_decay=log_decay, initial_state=initial_state, scale=scale,
                          output_final_state=True, chunk_size=C, cu_seqlens=cu_seqlens)

        def cp(q, k, v, initial_state, log_decay=None, beta=None, cu_seqlens=None, scale=None):
            gates = (beta,) if op == "delta" else ()
            return sharded(q, k, v, *gates, log_decay, mesh=mesh, batch_axes=batch_axes, chunk_size=C,
                           initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens,
                           scale=scale)

        def hand(q, k, v, log_decay, initial_state, beta=None, cu_seqlens=None):
            # the in-shard_map function called by hand (T padded by the caller: 45 -> 48)
            P = mesh.shape["seq"]
            Tp = -(-T // P) * P
            pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
            gates = (pad(beta),) if op == "delta" else ()
            cu = None if cu_seqlens is None else cu_seqlens.at[-1].set(Tp)
            tok = Ps(None, "seq")
            state = Ps() if cu is not None else Ps(None)
            nt = 4 + len(gates)

            def body(*a):
                return inside(*a[:nt], axis_name="seq", chunk_size=C, initial_state=a[nt],
                              cu_seqlens=a[nt + 1] if cu is not None else None, output_final_state=True)

            args = (pad(q), pad(k), pad(v)) + gates + (pad(log_decay), initial_state) + ((cu,) if cu is not None else ())
            specs = (tok,) * nt + (state,) + ((Ps(),) if cu is not None else ())
            args = [jax.reshard(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, specs)]
            o, S = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok, state))(*args)
            return jax.reshard(o, jax.sharding.NamedSharding(mesh, Ps()))[:, :T], S

        return {"single": ref, "cp": hand if by_hand else cp}

    import importlib
    from tttla_jax.parallel import ops as cp_ops
    dr_mod = importlib.import_module("tttla_jax.ops.delta_rule")
    default_blocks = (cp_ops._BLOCK_TOKENS, cp_ops._CONTRACT_BLOCK, cp_ops._CONTRACT_MIN_BLOCK)
    default_group = dr_mod._GROUP_CHUNKS
    default_state_groups = cp_ops._DELTA_STATE_GROUPS
    # trace-time counter: the unpacked linear attention takes the chunk-states-first form
    used = {"la": 0}
    la_form = cp_ops._la_states_first

    def counted(*a, **kw):
        used["la"] += 1
        return la_form(*a, **kw)

    cp_ops._la_states_first = counted
    results = []
    for case in json.loads(sys.argv[1]):
        used["la"] = 0
        op, P, packed, dtype = case["op"], case["P"], case["packed"], case["dtype"]
        # "blocks": the token-block loops of the state passes (forward-only widened passes, the
        # delta rule's state-only passes, state-sized contractions) on blocks of 4 tokens
        # instead of the default sizes
        blocks = (4, 4, 1) if case.get("blocks") else default_blocks
        cp_ops._BLOCK_TOKENS, cp_ops._CONTRACT_BLOCK, cp_ops._CONTRACT_MIN_BLOCK = blocks
        # "blocks" also runs the chunked form (single device and the delta rule's widened
        # pass) in groups of 2 chunks, so the widened pass loops over several groups, the last
        # one padded; "widened": False the delta rule's state-only transform and cotangent passes
        dr_mod._GROUP_CHUNKS = case.get("group", 2 if case.get("blocks") else default_group)
        # "state_groups": groups per stored state of the delta rule's widened pass (default 2:
        # the slice's groups are stored and recomputed in blocks of two, the last block padded
        # when the number of groups is odd)
        cp_ops._DELTA_STATE_GROUPS = case.get("state_groups", default_state_groups)
        cp_ops._DELTA_WIDENED = case.get("widened", True)
        data = case.get("data", 1)
        types = (jax.sharding.AxisType.Auto if case.get("auto") else jax.sharding.AxisType.Explicit,) * 2
        mesh = jax.make_mesh((data, P), ("data", "seq"), devices=jax.devices()[:data * P], axis_types=types)
        B = 1 if packed else 2 * data
        x = inputs(op, B, packed, jnp.dtype(dtype), seed=P + 10 * packed, scale=case.get("scale", False),
                   decay=case.get("decay", True))
        rep = check_equivalence(forms(op, mesh, "data" if data > 1 else None, case.get("by_hand", False)), x)
        results.append({"case": case, "ok": rep.ok, "report": str(rep), "la_form": used["la"]})
    print("RESULTS" + json.dumps(results))
""")


def _env(devices=8):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cases):
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS")][-1]
    results = json.loads(line[len("RESULTS"):])
    bad = [f"{r['case']}\n{r['report']}" for r in results if not r["ok"]]
    assert not bad, "\n\n".join(bad)
    # not vacuous: the unpacked linear attention ran the chunk-states-first form
    missed = [r["case"] for r in results if r["case"]["op"] == "linear" and not r["case"]["packed"] and not r["la_form"]]
    assert not missed, missed
    assert len(results) == len(cases)


DEFAULT_CASES = [
    {"op": "delta", "P": 4, "packed": True, "dtype": "float64", "blocks": True},
    {"op": "delta", "P": 4, "packed": False, "dtype": "float64", "blocks": True, "group": 1},
    {"op": "linear", "P": 4, "packed": False, "dtype": "float64", "data": 2, "auto": True, "scale": True},
]


def test_sharded_ops_match_single_device():
    """P = 4 (T = 45 padded to 48): packed documents across devices for the delta rule
    (explicit mesh axes, jax.make_mesh's default; the state passes' token-block loops on blocks
    of 4 tokens, so documents also cross blocks), and the unpacked linear attention with the
    batch split over a second mesh axis (automatic mesh axes; one block). The packed linear
    attention across devices (also in the default suite through the packed language model of
    tests/test_context_parallel_packed.py) and the unpacked delta rule with a batch axis are in
    the slow sweep."""
    _run(DEFAULT_CASES)


@pytest.mark.slow
def test_sharded_ops_match_single_device_sweep():
    """Both ops, P = 2, 4, 8, packed and not, float64; float32; the in-shard_map functions
    called by hand; batch split over ``data`` for the linear attention; the token-block loops
    on blocks of 4 tokens at P = 2 and 8."""
    cases = [{"op": op, "P": P, "packed": packed, "dtype": "float64"}
             for op in ("linear", "delta") for P in (2, 4, 8) for packed in (False, True)]
    cases += [{"op": op, "P": 4, "packed": packed, "dtype": "float32"}
              for op in ("linear", "delta") for packed in (False, True)]
    cases += [{"op": op, "P": 4, "packed": packed, "dtype": "float64", "by_hand": True}
              for op in ("linear", "delta") for packed in (False, True)]
    cases += [{"op": op, "P": 2, "packed": False, "dtype": "float64", "data": 2} for op in ("linear", "delta")]
    cases += [{"op": "linear", "P": P, "packed": False, "dtype": "float64", "scale": True, "decay": decay}
              for P in (2, 8) for decay in (True, False)]
    cases += [{"op": op, "P": P, "packed": packed, "dtype": "float64", "blocks": True}
              for op in ("linear", "delta") for P in (2, 8) for packed in (False, True)]
    cases += [{"op": "delta", "P": P, "packed": False, "dtype": "float64", "widened": False, "blocks": blocks}
              for P, blocks in ((2, False), (8, True))]
    # the widened pass's stored states: one per group, or per block of 2 / 3 groups (P = 2: 6
    # chunks in groups of 2 -> 3 groups: blocks of 2 with a padded last one, of 3 exactly)
    cases += [{"op": "delta", "P": P, "packed": False, "dtype": "float64", "blocks": True, "state_groups": r}
              for P, r in ((2, 1), (2, 3), (2, 2), (4, 1))]
    _run(cases)


# --------------------------------------------------------------------------- input validation (1 device)


def _mesh(names=("seq",)):
    return jax.make_mesh((1,) * len(names), names, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _qkv(B=1, T=8, H=2, K=3, V=4):
    r = np.random.default_rng(0)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((B, T, H, K), (B, T, H, K), (B, T, H, V)))


@pytest.mark.slow
def test_one_device_mesh_equals_the_op():
    """A one-device mesh (P = 1) equals the op (also test_traced_scale_and_jit)."""
    q, k, v = _qkv()
    beta = jnp.full(q.shape[:3], 0.5, jnp.float32)
    o, S = tp.sharded_delta_rule(q, k, v, beta, mesh=_mesh(), output_final_state=True, chunk_size=4)
    o1, S1 = tt.delta_rule(q, k, v, beta, output_final_state=True, chunk_size=4)
    tt.testing.assert_trees_close((o, S), (o1, S1), rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(seq_axis="sequence"), r"seq_axis: 'sequence' is not an axis of the mesh"),
    (dict(batch_axes="data"), r"batch_axes: axis 'data' is not in the mesh"),
    (dict(batch_axes="seq"), r"batch_axes: .* contains the sequence axis 'seq'"),
    (dict(mesh=None), r"mesh: expected a jax.sharding.Mesh, got NoneType"),
    (dict(cu_seqlens=jnp.array([0, 3, 7])), r"cu_seqlens: expected to start at 0 and end at T = 8"),
    (dict(initial_state=jnp.zeros((2, 2, 3, 3))), r"initial_state: expected shape \[B, H, K, V\]"),
    (dict(log_decay=jnp.zeros((1, 8, 3))), r"log_decay: expected shape \[B, T, H\]"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int"),
])
def test_wrapper_errors(kw, match):
    q, k, v = _qkv()
    kw = {"mesh": _mesh(), **kw}
    with pytest.raises(ValueError, match=match):
        tp.sharded_linear_attention(q, k, v, **kw)


def test_wrapper_batch_errors():
    mesh = _mesh(("data", "seq"))
    q, k, v = _qkv(B=1)
    with pytest.raises(ValueError, match=r"batch_axes: packed sequences \(cu_seqlens\) are a batch of one"):
        tp.sharded_linear_attention(q, k, v, mesh=mesh, batch_axes="data", cu_seqlens=jnp.array([0, 8]))
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, T, H\]"):
        tp.sharded_delta_rule(q, k, v, jnp.zeros((1, 8)), mesh=mesh)


def test_inside_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"axis_name: 'seq' is not a mapped axis here"):
        tp.linear_attention(q, k, v, axis_name="seq")
    mesh = _mesh()

    def body(q, k, v):
        return tp.linear_attention(q, k, v, axis_name="seq", cu_seqlens=np.array([0, 3, 9]))

    with pytest.raises(ValueError, match=r"cu_seqlens: expected global offsets from 0 to P·L = 1 · 8 = 8"):
        jax.shard_map(body, mesh=mesh, in_specs=jax.sharding.PartitionSpec(None, "seq"),
                      out_specs=jax.sharding.PartitionSpec(None, "seq"))(q, k, v)


@pytest.mark.slow  # offsets the traced scale of the default multi-device case, which covers it on 4 devices
def test_traced_scale_and_jit():
    """A scale computed under jit reaches every device as an operand (and is differentiable)."""
    q, k, v = _qkv()
    mesh = _mesh()

    def f(s):
        o, _ = tp.sharded_linear_attention(q, k, v, scale=s, mesh=mesh, chunk_size=4)
        return jnp.sum(o ** 2)

    def f1(s):
        o, _ = tt.linear_attention(q, k, v, scale=s, chunk_size=4)
        return jnp.sum(o ** 2)

    s = jnp.float32(0.3)
    tt.testing.assert_trees_close(jax.jit(jax.value_and_grad(f))(s), jax.value_and_grad(f1)(s), rtol=1e-5)
