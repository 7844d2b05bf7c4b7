"""Training throughput of a tiny LaCT language model: tokens/s of forward + backward.

``LanguageModel`` with ``num_layers`` LaCT mixers (``tt.nn.LaCTLayer``, no attention
branch unless ``--window``), width 128, 4 heads of dim 32, sequence 128, batch 16,
vocabulary 256, float32, on this machine's CPU. One step = ``jax.value_and_grad`` of the
next-token cross-entropy w.r.t. all parameters (no optimiser update), jitted; the **median**
of ``--reps`` rounds after a compile + warm-up step, the implementations of a preset taking
turns in every round (``benchmarks/_timing.interleaved``), so the parallel/recurrent speed-up
(the paper's end-to-end 1.19x for V2, docs/ladder.md) is not at the mercy of one slow spell.
Presets ``v0`` (recurrent only: not associative) and ``v2`` (``auto`` = the rule's parallel
form, the chunked layout on CPU) by default; the ``form`` column is the layer's
``resolved_impl``. Prints a Markdown table and writes ``benchmarks/results/lact_lm.json`` with the
shared ``machine`` record (load average at start and end, malloc tuning — the machine is
shared; ``--no-tune-malloc`` measures glibc's default malloc).

    python benchmarks/lact_lm.py [--presets v0 v2] [--impls auto recurrent] [--chunk 32] [--reps 5]
                                 [--seq 128] [--batch 16] [--no-tune-malloc] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import describe, interleaved, machine, setup  # noqa: E402

from tttla_jax.nn import LanguageModel, LMConfig  # noqa: E402


def step_fn(graphdef):
    def loss(params, tokens):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["v0", "v2"])
    ap.add_argument("--impls", nargs="+", default=["auto", "recurrent"],
                    help="LaCTLayer implementations (docs/implementations.md)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lact_lm.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="measure with glibc's default malloc")
    a = ap.parse_args(argv)
    start = setup(tune=not a.no_tune_malloc)

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, a.vocab, size=(a.batch, a.seq + 1)), jnp.int32)
    rows = []
    print("| preset | impl | form | compile+first step s | step ms (median) | tokens/s | vs recurrent |")
    print("|---|---|---|---|---|---|---|")
    for preset in a.presets:
        steps, forms = {}, {}
        for impl in a.impls:
            opts = {"preset": preset, "chunk_size": a.chunk}
            if a.window:
                opts["window"] = a.window
            try:
                cfg = LMConfig(vocab_size=a.vocab, width=a.width, num_layers=a.layers, num_heads=a.heads,
                               mixers="lact", mixer_options={"lact": opts}, impl=impl)
            except ValueError as e:
                print(f"| {preset} | {impl} | — | — | — | ({e}) | |")
                continue
            model = LanguageModel(cfg, rngs=nnx.Rngs(0))  # same seed: the same parameters for every impl
            forms[impl] = model.blocks[0].mixer.resolved_impl
            graphdef, params = nnx.split(model)
            steps[impl] = (lambda f, p: (lambda toks: f(p, toks)))(step_fn(graphdef), params)
        t = interleaved(steps, tokens, rounds=a.reps)  # the impls of a preset take turns in every round
        for impl in steps:
            med = t[impl]["median"]
            ref = t.get("recurrent", {}).get("median")
            row = dict(preset=preset, impl=impl, form=forms[impl], first_s=t[impl]["compile"], step_s=med,
                       tokens_per_s=a.batch * a.seq / med, samples_s=t[impl]["samples"],
                       speedup_vs_recurrent=None if ref is None else ref / med)
            rows.append(row)
            sp = "—" if row["speedup_vs_recurrent"] is None else f"{row['speedup_vs_recurrent']:.2f}x"
            print(f"| {preset} | {impl} | {row['form']} | {row['first_s']:.1f} | {med * 1e3:.1f} "
                  f"| {row['tokens_per_s']:,.0f} | {sp} |", flush=True)
    m = machine(start)
    print(f"\n{describe(m)}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(width=a.width, layers=a.layers, heads=a.heads, seq=a.seq, batch=a.batch,
                                   vocab=a.vocab, chunk=a.chunk, window=a.window, dtype="float32",
                                   reps=a.reps,
                                   note="forward + backward (value_and_grad of the LM loss), no optimiser; "
                                        "median of reps interleaved rounds after one compile/warm-up step; "
                                        "the machine may be "
                                        "shared with other jobs, see machine.loadavg_start/end"),
                       machine=m, results=rows), fh, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
