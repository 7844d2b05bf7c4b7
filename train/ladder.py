"""``python -m train.ladder``: the paper's simplification ladder at small scale.

Trains one small LM (or MQAR model, ``--preset mqar``) per LaCT variant — the ladder
V0 … V6 (docs/ladder.md, paper Table 2: each step removes one component of LaCT, V2 onwards
has a parallel form, V6 is plain linear attention) and the anomalies of paper Table 1
(``ascent``: the inner update's sign flipped; ``q_is_k``: the layer reads its keys
instead of its queries) — with the same budget, seed and data order, then reports

* quality: held-out perplexity (LM) or MQAR test accuracy;
* the TTT operator's forward throughput on this machine (tokens/s of the fast-weight
  rule alone, ``LaCTRule.recurrent`` and, for associative variants, ``LaCTRule.parallel``;
  B=1, T=``--throughput-tokens``, the model's heads, head dim and chunk size);
* the inner-steps-at-inference sweep (paper §4, Table 1): the trained V0 model evaluated
  with 1, 2, 4, 8 gradient steps per chunk: the inner (key-value binding) loss
  ``-<f(k), v>`` before and after each chunk's update, averaged over the LaCT layers, and
  the task loss. More inner steps bind the keys to the values better (lower inner loss)
  — if TTT were memorisation that retrieval relies on, task loss would improve too.

Writes ``<out>/ladder.md`` and ``<out>/ladder.json`` (``<out>`` defaults to
``runs/ladder/<preset>``); every variant is an ordinary resumable training run in
``<out>/<variant>/`` (re-running continues or reuses finished runs).

Default size (LM): 2 LaCT layers (fast-weight branch only), width 64, 2 heads, chunk 32,
sequences of 128 bytes, batch 16, 200 steps per variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("v0", "v1", "v2", "v3", "v4", "v5", "v6", "ascent", "q_is_k")
CHANGES = {
    "v0": "LaCT (SwiGLU fast net, all layers updated, weight norm, per-token lr, momentum, Muon)",
    "v1": "+ update only the last layer W1",
    "v2": "+ no weight norm (parallel form exists)",
    "v3": "+ single linear fast layer",
    "v4": "+ constant inner lr",
    "v5": "+ no momentum",
    "v6": "+ no Muon (= linear attention)",
    "ascent": "V0 with the inner update's sign flipped",
    "q_is_k": "V0 reading with the keys instead of the queries",
}
INNER_STEPS = (1, 2, 4, 8)

# Ladder model/budget per task (any TrainConfig field; CLI flags override).
LADDER = {
    "lm-tiny": dict(mixers=("lact",), width=64, num_layers=2, num_heads=2, chunk_size=32,
                    seq_len=128, batch_size=16, steps=200, lr=3e-3, warmup_steps=20,
                    eval_batches=8, lact_window=0),
    "mqar": dict(mixers=("lact",), width=64, num_layers=2, num_heads=2, chunk_size=16,
                 seq_len=64, mqar_kv=4, batch_size=32, steps=400, lr=1e-2, warmup_steps=40,
                 lact_window=0),
}


def _log(*a):
    print(*a, flush=True)


def variant_config(preset: str, variant: str, out: str, overrides: dict):
    from tttla_jax.train.config import make_config
    kw = dict(LADDER[preset])
    kw.update(overrides)
    steps = kw["steps"]
    kw.update(lact_preset=variant, ckpt_dir=os.path.join(out, variant), resume=True,
              eval_every=steps, ckpt_every=steps, log_every=max(1, min(10, steps)), keep=1,
              progress=False, plot=False, sample_tokens=0)
    return make_config(preset, **kw)


# ------------------------------------------------------------------ operator throughput

def _rule_inputs(rule, B, T, H, D, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)  # noqa: E731
    q, k = f(B, T, H, D, scale=D ** -0.5), f(B, T, H, D, scale=D ** -0.5)
    v = f(B, T, H, D)
    lr = jnp.asarray(rng.uniform(1e-4, 1e-3, size=(B, T, H, 3)), jnp.float32)
    m = jnp.asarray(rng.uniform(0.5, 0.95, size=(B, T, H)), jnp.float32)
    w1 = f(H, D, D, scale=D ** -0.5)
    w0 = w2 = None
    if not rule.linear:
        w0, w2 = f(H, D, D, scale=D ** -0.5), f(H, D, D, scale=D ** -0.5)
    return q, k, v, lr, rule.init_state(w0, w1, w2, B), m


def _best_time(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def operator_throughput(variant: str, *, tokens: int, heads: int, head_dim: int, chunk_size: int,
                        reps: int = 3) -> dict:
    """Forward tokens/s of the LaCT rule of ``variant`` (recurrent; parallel if associative)."""
    from tttla_jax.rules.ladder import ladder
    rule = ladder(variant, chunk_size=chunk_size)
    args = _rule_inputs(rule, 1, tokens, heads, head_dim)
    rec = jax.jit(lambda q, k, v, lr, st, m: rule.recurrent(q, k, v, lr, st, m)[0])
    out = {"recurrent_tok_s": tokens / _best_time(rec, args, reps), "parallel_tok_s": None,
           "no_parallel_form": rule.breaks_associativity()}
    if out["no_parallel_form"] is None:
        par = jax.jit(lambda q, k, v, lr, st, m: rule.parallel(q, k, v, lr, st, m)[0])
        out["parallel_tok_s"] = tokens / _best_time(par, args, reps)
    return out


# ------------------------------------------------------------------ inner-steps sweep

def _lact_layers_inner_loss(model, tokens, inner_steps: int):
    """Mean over LaCT layers of the inner loss ``-<f(k), v>`` per token of the updating
    chunks, with the fast weights before the chunk's update and after it (``inner_steps``
    gradient steps per chunk).

    Uses only the rule's public recurrent form: reading with the keys (q = k) gives
    ``f_{W before chunk c}(k_c)``; shifting the keys one chunk later (queries of chunk
    c+1 = keys of chunk c) gives ``f_{W after chunk c}(k_c)``, since chunk c+1 reads the
    weights right after chunk c's update (apply-then-update).
    """
    from tttla_jax.nn.lact import LaCTLayer
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    x = model.embed(tokens)
    before, after = [], []
    for block in model.blocks:
        layer = block.mixer
        if isinstance(layer, LaCTLayer):
            rule = dataclasses.replace(layer.rule, inner_steps=inner_steps, q_is_k=False)
            C = rule.chunk_size
            if T < 2 * C or T % C:
                raise ValueError(f"seq_len: the inner-loss sweep needs a multiple of chunk_size={C} "
                                 f"with at least 2 chunks, got {T}")
            q, k, v, lr, m, _ = layer._project(block.mixer_norm(x), positions)
            st0 = rule.init_state(*layer._fast_params(), B)
            o_b, _ = rule.recurrent(k, k, v, lr, st0, m)
            q_shift = jnp.concatenate([k[:, :C], k[:, :-C]], axis=1)
            o_a, _ = rule.recurrent(q_shift, k, v, lr, st0, m)
            vf = v.astype(jnp.float32)
            before.append(-jnp.mean(jnp.sum(o_b[:, :T - C].astype(jnp.float32) * vf[:, :T - C], -1)))
            after.append(-jnp.mean(jnp.sum(o_a[:, C:].astype(jnp.float32) * vf[:, :T - C], -1)))
        x, _ = block(x, None, positions)
    return jnp.mean(jnp.stack(before)), jnp.mean(jnp.stack(after))


def lm_with_inner_steps(cfg, inner_steps: int):
    """The ladder LM of ``cfg`` (as :func:`tttla_jax.train.loop.build_model`) with its LaCT layers
    built with ``inner_steps`` gradient steps per chunk (same parameters)."""
    from flax import nnx
    from tttla_jax.nn.model import LanguageModel, LMConfig
    if set(cfg.mixers) != {"lact"}:
        raise ValueError(f"mixers: the inner-steps sweep expects LaCT layers only, got {cfg.mixers}")
    opts = {"lact": {"preset": cfg.lact_preset, "chunk_size": cfg.chunk_size,
                     "window": cfg.lact_window or None, "base_lr": cfg.lact_base_lr,
                     "inner_steps": inner_steps}}
    lm = LMConfig(vocab_size=cfg.vocab_size, width=cfg.width, num_layers=cfg.num_layers,
                  num_heads=cfg.num_heads, mixers=cfg.mixers, mixer_options=opts,
                  param_dtype=jnp.float32)
    return LanguageModel(lm, rngs=nnx.Rngs(cfg.seed))


def inner_steps_sweep(cfg, params, steps=INNER_STEPS) -> list:
    """Evaluate the trained model ``params`` with ``n`` inner steps per chunk."""
    from flax import nnx
    from tttla_jax.train import data as data_lib
    from tttla_jax.train.loop import evaluate, make_steps
    rows = []
    evals = data_lib.eval_batches(cfg)
    with jax.enable_x64(False):
        for n in steps:
            graphdef, _, rest = nnx.split(lm_with_inner_steps(cfg, n), nnx.Param, ...)
            _, eval_step = make_steps(graphdef, cfg)
            ev = evaluate(lambda p, b: eval_step(p, rest, b), params, evals)

            @jax.jit
            def inner(p, tokens):
                return _lact_layers_inner_loss(nnx.merge(graphdef, p, rest), tokens, n)

            b_, a_ = zip(*[inner(params, jnp.asarray(b["inputs"])) for b in evals])
            rows.append({"inner_steps": n, "inner_loss_before": float(np.mean(b_)),
                         "inner_loss_after": float(np.mean(a_)), **ev})
            _log(f"  inner steps {n}: inner loss {rows[-1]['inner_loss_before']:.4f} -> "
                 f"{rows[-1]['inner_loss_after']:.4f}, task loss {ev['eval_loss']:.4f}")
    return rows


# ------------------------------------------------------------------ the report

def markdown(report: dict) -> str:
    task = report["task"]
    lines = [f"# LaCT ladder at small scale ({report['preset']})", "",
             f"{report['model']}; {report['budget']}; seed {report['seed']}. "
             f"Operator throughput: forward of the fast-weight rule alone, float32, B=1, "
             f"T={report['throughput']['tokens']}, {report['throughput']['heads']} heads of dim "
             f"{report['throughput']['head_dim']}, chunk {report['throughput']['chunk_size']}, "
             f"{report['machine']}.", ""]
    q = "MQAR test accuracy" if task == "mqar" else "held-out ppl (bytes)"
    lines += [f"| variant | change | {q} | eval loss | recurrent tok/s | parallel tok/s | par/rec |",
              "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        qv = f"{r['eval_accuracy']:.3f}" if task == "mqar" else f"{r['eval_ppl']:.3f}"
        rec, par = r.get("recurrent_tok_s"), r.get("parallel_tok_s")
        lines.append(
            f"| {r['variant']} | {CHANGES[r['variant']]} | {qv} | {r['eval_loss']:.4f} | "
            f"{'—' if rec is None else f'{rec:,.0f}'} | {'—' if par is None else f'{par:,.0f}'} | "
            f"{'—' if not (rec and par) else f'{par / rec:.2f}x'} |")
    if report.get("inner_steps_sweep"):
        lines += ["", f"Inner steps at inference (the trained {report['sweep_variant'].upper()} model; "
                  "paper §4): inner loss "
                  "`-<f(k), v>` per token of the updating chunks, before and after the chunk's "
                  "update, mean over LaCT layers.", "",
                  "| inner steps | inner loss before | inner loss after | task loss | "
                  + ("MQAR accuracy |" if task == "mqar" else "ppl |"), "|---|---|---|---|---|"]
        for r in report["inner_steps_sweep"]:
            qv = f"{r['eval_accuracy']:.3f}" if task == "mqar" else f"{r['eval_ppl']:.3f}"
            lines.append(f"| {r['inner_steps']} | {r['inner_loss_before']:.4f} | "
                         f"{r['inner_loss_after']:.4f} | {r['eval_loss']:.4f} | {qv} |")
    lines += ["", f"Wall clock: {report['wall_clock_s'] / 60:.1f} min; load average at the end "
              f"{report['loadavg']}."]
    return "\n".join(lines) + "\n"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m train.ladder", description=__doc__.split("\n\n")[1],
                                allow_abbrev=False)
    p.add_argument("--preset", choices=tuple(LADDER), default="lm-tiny")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, help="optimiser steps per variant [preset's]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--mqar-test-examples", type=int)
    p.add_argument("--lact-window", type=int, help="add the SWA branch (LaCT-LLM hybrid) [0]")
    p.add_argument("--inner-steps", type=int, nargs="*", default=list(INNER_STEPS),
                   help="inner steps at inference for the V0 sweep (empty: skip) [1 2 4 8]")
    p.add_argument("--sweep-variant", choices=VARIANTS, default="v0",
                   help="the trained variant of the inner-steps sweep [v0]")
    p.add_argument("--throughput-tokens", type=int, default=4096,
                   help="sequence length of the operator throughput measurement [4096]")
    p.add_argument("--throughput-reps", type=int, default=3)
    p.add_argument("--out", default="", help="output directory [runs/ladder/<preset>]")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    from tttla_jax.train.loop import run
    t0 = time.perf_counter()
    out = a.out or os.path.join("runs", "ladder", a.preset)
    os.makedirs(out, exist_ok=True)
    overrides = {k: v for k, v in dict(
        steps=a.steps, width=a.width, num_layers=a.num_layers, num_heads=a.num_heads,
        chunk_size=a.chunk_size, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
        eval_batches=a.eval_batches, mqar_test_examples=a.mqar_test_examples,
        lact_window=a.lact_window).items() if v is not None}
    overrides["seed"] = a.seed
    try:
        cfgs = {v: variant_config(a.preset, v, out, overrides) for v in a.variants}
    except ValueError as e:
        build_parser().error(str(e))
    rows, sweep = [], None
    cfg0 = next(iter(cfgs.values()))
    for variant, cfg in cfgs.items():
        _log(f"[{variant}] {CHANGES[variant]}: training {cfg.steps} steps in {cfg.run_dir}")
        t = time.perf_counter()
        summary = run(cfg, log=lambda *m: None)
        ev = summary["final_eval"]
        row = {"variant": variant, "change": CHANGES[variant], "eval_loss": ev["eval_loss"],
               "eval_ppl": ev["eval_ppl"], "eval_accuracy": ev["eval_accuracy"],
               "n_params": summary["n_params"], "train_wall_s": time.perf_counter() - t}
        _log(f"[{variant}] eval loss {ev['eval_loss']:.4f} (ppl {ev['eval_ppl']:.3f}, accuracy "
             f"{ev['eval_accuracy']:.3f}) in {row['train_wall_s']:.0f} s")
        if variant == a.sweep_variant and a.inner_steps:
            sweep = inner_steps_sweep(cfg, summary["params"], tuple(a.inner_steps))
        D = cfg.width // cfg.num_heads
        with jax.enable_x64(False):
            tp = operator_throughput(variant, tokens=a.throughput_tokens, heads=cfg.num_heads,
                                     head_dim=D, chunk_size=cfg.chunk_size, reps=a.throughput_reps)
        row.update(tp)
        _log(f"[{variant}] operator: recurrent {tp['recurrent_tok_s']:,.0f} tok/s"
             + ("" if tp["parallel_tok_s"] is None else f", parallel {tp['parallel_tok_s']:,.0f} tok/s"))
        rows.append(row)
        _write_report(out, _report(a, cfg0, rows, sweep, t0))  # partial results survive a stop
    report = _report(a, cfg0, rows, sweep, t0)
    md = _write_report(out, report)
    print()
    print(md)
    print(f"wrote {os.path.join(out, 'ladder.md')} and ladder.json")
    return report


def _write_report(out, report) -> str:
    md = markdown(report)
    with open(os.path.join(out, "ladder.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "ladder.md"), "w") as f:
        f.write(md)
    return md


def _report(a, cfg0, rows, sweep, t0) -> dict:
    return {
        "preset": a.preset, "task": cfg0.task, "seed": a.seed,
        "model": (f"{cfg0.num_layers} LaCT layers" + (f" + SWA({cfg0.lact_window}) branch"
                                                      if cfg0.lact_window else "")
                  + f", width {cfg0.width}, {cfg0.num_heads} heads, chunk {cfg0.chunk_size}"),
        "budget": f"{cfg0.steps} steps of {cfg0.batch_size} x {cfg0.seq_len} tokens",
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(cfg0).items() if k not in ("ckpt_dir", "lact_preset")},
        "throughput": {"tokens": a.throughput_tokens, "heads": cfg0.num_heads,
                       "head_dim": cfg0.width // cfg0.num_heads, "chunk_size": cfg0.chunk_size,
                       "batch": 1, "dtype": "float32", "reps": a.throughput_reps},
        "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
        "rows": rows, "inner_steps_sweep": sweep, "sweep_variant": a.sweep_variant,
        "wall_clock_s": time.perf_counter() - t0, "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":
    main()
    sys.exit(0)
