"""The chunked (gated) delta rule runs token-major, forward and backward: each group of
chunks is sliced straight from the ``[B, T, H, d]`` inputs, outputs and gradients are
written in place (``chunk.delta_chunked_tokens`` / ``chunk.delta_chunked_tokens_bwd``, a
hand-written reverse mode that recomputes each group from its stored start state).

Checked against the token scan in float64 at the harness' 1e-10: outputs, final state and
gradients w.r.t. every input (queries, keys, values, β, the log-decay, the initial state and
a traced scale), with a per-head log-decay holding ``-inf`` (hard resets) and a single
``-1e30`` token, and without a log-decay; at lengths that are not a multiple of the chunk
(padded), over several groups; forward-only and differentiated calls must run the token-major
scans (checked with spies). ``@slow``: gradients over 17 chunks (the unrolled group scan),
under ``jax.vmap``; the token-major and group-layout scans agree bitwise in the forward and
to rounding in the backward."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tttla_jax as tt
from tttla_jax.ops import chunk

dr = importlib.import_module("tttla_jax.ops.delta_rule")

B, T, H, K, V, C = 2, 67, 2, 4, 3, 4  # 17 chunks (the last one padded), 5 groups of 4


def _inputs(decayed, T=T):
    rng = np.random.default_rng(1)
    k = rng.normal(size=(B, T, H, K))
    x = dict(q=rng.normal(size=(B, T, H, K)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
             v=rng.normal(size=(B, T, H, V)), beta=rng.uniform(0.1, 1.5, size=(B, T, H)),
             h0=rng.normal(size=(B, H, K, V)))
    if decayed:
        g = -rng.uniform(0, 0.5, size=(B, T, H))
        g[0, min(50, T - 2), 1] = g[1, 5, 0] = -np.inf
        g[0, 9, 0] = -1e30
        x["g"] = g
    return {n: jnp.asarray(a, jnp.float64) for n, a in x.items()}


def _form(impl):
    def run(q, k, v, beta, h0, g=None, scale=None):
        return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True,
                             chunk_size=C, impl=impl, scale=scale)
    return run


def _spy(monkeypatch, name):
    calls = []
    f = getattr(chunk, name)
    monkeypatch.setattr(chunk, name, lambda *a, **kw: calls.append(1) or f(*a, **kw))
    return calls


def _forms():
    return {"recurrent": _form("recurrent"), "chunked": _form("chunked")}


@pytest.mark.parametrize("decayed", [True, False], ids=["gated", "no_decay"])
def test_token_major_equals_token_scan_float64(decayed, monkeypatch):
    fwd, bwd = _spy(monkeypatch, "delta_chunked_tokens"), _spy(monkeypatch, "delta_chunked_tokens_bwd")
    x = _inputs(decayed)
    # forward only (outputs and final state), 17 chunks: the token-major scan
    report = tt.testing.check_equivalence(_forms(), x, baseline="recurrent", check_grads=False)
    print(report)
    report.assert_ok()
    assert fwd, "the chunked forward did not run the token-major scan"
    # gradients w.r.t. every input on 21 tokens (6 chunks in 2 groups, the last chunk padded);
    # gated: the default scale, applied group by group; no decay: a traced scale (applied
    # before the scan, its gradient through the product)
    short = {n: a if n == "h0" else a[:, :21] for n, a in x.items()}
    if not decayed:
        short["scale"] = jnp.asarray(0.7, jnp.float64)
    report = tt.testing.check_equivalence(_forms(), short, baseline="recurrent")
    print(report)
    report.assert_ok()
    assert {e.quantity for e in report.entries} >= {f"grad[{n}]" for n in short}, report
    assert bwd, "the chunked backward did not run the token-major scan"


@pytest.mark.slow
@pytest.mark.parametrize("decayed", [True, False], ids=["gated", "no_decay"])
def test_token_major_gradients_unrolled_and_vmapped(decayed):
    """Gradients w.r.t. every input over 17 chunks (groups of 4 unrolled, the last group
    padded), and ``jax.vmap`` of the gradient over a leading axis equals the row-by-row
    gradients."""
    x = _inputs(decayed)
    report = tt.testing.check_equivalence(_forms(), x, baseline="recurrent")
    print(report)
    report.assert_ok()

    def loss(x):
        o, S = _form("chunked")(**x)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S * S)

    rows = [jax.tree.map(lambda a: a[i:i + 1], x) for i in range(B)]
    batched = jax.jit(jax.vmap(jax.grad(loss)))(jax.tree.map(lambda *a: jnp.stack(a), *rows))
    for i, r in enumerate(rows):
        ref = jax.jit(jax.grad(loss))(r)
        for n in ref:
            np.testing.assert_allclose(batched[n][i], ref[n], rtol=0, atol=1e-12, err_msg=n)


@pytest.mark.slow
def test_token_major_scan_equals_group_layout():
    """The token-major scans and the group-layout scan run the same group step: bitwise equal
    outputs and states (groups of 3: the last group padded with whole chunks; also a
    per-channel log-decay, which the scan supports though the dispatch does not use it), and
    gradients equal to rounding (the same group step differentiated)."""
    x = _inputs(True)
    g_channel = jnp.asarray(-np.random.default_rng(2).uniform(0, 0.5, size=(B, T, H, K))).at[0, 9, 1, 2].set(-jnp.inf)
    for c, G, g in ((C, 3, x["g"]), (C, 4, g_channel)):
        args = (x["q"], x["k"], x["v"], x["beta"], g, x["h0"])
        ref = jax.jit(lambda *a: chunk.delta_chunked(*a, c, group=G))(*args)
        got = jax.jit(lambda *a: chunk.delta_chunked_tokens(*a, c, G))(*args)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    args = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["h0"])
    w = jnp.cos(jnp.arange(B * T * H * V, dtype=jnp.float64)).reshape(B, T, H, V)
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * w) + jnp.sum(f(*a)[1])  # noqa: E731
    ref = jax.jit(jax.grad(loss(lambda *a: chunk.delta_chunked(*a, C, group=3)), argnums=range(6)))(*args)
    got = jax.jit(jax.grad(loss(lambda *a: dr._chunked_token_major(*a, C, 3, None)), argnums=range(6)))(*args)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


SHARD_MAP_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import PartitionSpec as P
import tttla_jax as tt
mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
B, T, H, K, V = 2, 21, 2, 4, 3
r = np.random.default_rng(0)
kk = r.normal(size=(B, T, H, K)); kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
g = -r.uniform(0, 0.4, (B, T, H)); g[0, 7, 1] = -np.inf
args = tuple(jnp.asarray(a) for a in (r.normal(size=(B, T, H, K)), kk, r.normal(size=(B, T, H, V)),
                                      r.uniform(0.1, 1, (B, T, H)), g, r.normal(size=(2 * B, H, K, V))))

def op(impl, q, k, v, beta, g, h0):
    return tt.delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True, chunk_size=4, impl=impl)

def scalar(o, S):
    return jnp.sum(jnp.sin(o)) + jnp.sum(S * S)

errs = {}
# (name, in_specs of q, k, v, beta, g and of h0 (None: no initial state))
for name, xs, hs in (("sharded", P("x"), P("x")), ("h0_varies", P(), P("x")), ("h0_shared", P("x"), P()),
                     ("no_h0", P("x"), None)):
    def body(q, k, v, beta, g, h0):
        o, S = op("chunked", q, k, v, beta, g, None if hs is None else h0)
        return (o[None] if xs == P() else o), S
    sm = jax.shard_map(body, mesh=mesh, in_specs=(xs,) * 5 + (P() if hs is None else hs,), out_specs=(P("x"), P("x")))
    a = args[:5] + ({"sharded": args[5][:B], "h0_varies": args[5]}.get(name, args[5][:1]),)
    got = jax.jit(jax.value_and_grad(lambda *a: scalar(*sm(*a)), argnums=range(6)))(*a)

    def ref(q, k, v, beta, g, h0):
        if xs == P():  # every device runs the whole batch from its own states
            return sum(scalar(*op("recurrent", q, k, v, beta, g, h0[i * B:(i + 1) * B])) for i in range(2))
        h = None if hs is None else jnp.broadcast_to(h0, (B,) + h0.shape[1:])
        return scalar(*op("recurrent", q, k, v, beta, g, h))
    want = jax.jit(jax.value_and_grad(ref, argnums=range(6)))(*a)
    errs[name] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print("RESULT" + json.dumps(errs))
'''


@pytest.mark.slow
def test_token_major_under_shard_map():
    """Under ``shard_map`` (2 devices, check_vma) the custom VJP returns every cotangent in its
    input's type: sequences sharded with their states; replicated sequences with per-device
    states (their cotangents summed over the devices); sharded sequences with one shared
    initial state, and with none (the state's cotangent summed). Float64, against the token
    scan at 1e-10."""
    import json
    import subprocess
    import sys

    from _devices import REPO, device_env
    p = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=REPO, env=device_env(2),
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    errs = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert set(errs) == {"sharded", "h0_varies", "h0_shared", "no_h0"}, errs
    assert max(errs.values()) <= 1e-10, errs
