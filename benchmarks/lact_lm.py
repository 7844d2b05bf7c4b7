"""Training throughput of a tiny LaCT language model: tokens/s of forward + backward.

``LanguageModel`` with ``num_layers`` LaCT mixers (``tt.nn.LaCTLayer``, no attention
branch unless ``--window``), width 128, 4 heads of dim 32, sequence 128, batch 16,
vocabulary 256, float32, on this machine's CPU. One step = ``jax.value_and_grad`` of the
next-token cross-entropy w.r.t. all parameters (no optimiser update), jitted; the **best**
(minimum) of ``--reps`` timed steps after a compile + warm-up step
(``benchmarks/_timing.timeit(...)["best"]``, as before the shared helper). Presets ``v0``
(recurrent only: not associative) and ``v2`` (``auto`` = the rule's parallel form) by
default. Prints a Markdown table and writes ``benchmarks/results/lact_lm.json`` with the
shared ``machine`` record (load average at start and end, malloc tuning — the machine is
shared; ``--no-tune-malloc`` measures glibc's default malloc).

    python benchmarks/lact_lm.py [--presets v0 v2] [--modes auto recurrent] [--chunk 32] [--reps 5]
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
from _timing import describe, machine, setup, timeit  # noqa: E402

from tttla_jax.nn import LanguageModel, LMConfig  # noqa: E402


def step_fn(graphdef):
    def loss(params, tokens):
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["v0", "v2"])
    ap.add_argument("--modes", nargs="+", default=["auto", "recurrent"])
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
    print(f"| preset | mode | form | compile+first step s | step ms | tokens/s |")
    print(f"|---|---|---|---|---|---|")
    for preset in a.presets:
        for mode in a.modes:
            opts = {"preset": preset, "chunk_size": a.chunk}
            if a.window:
                opts["window"] = a.window
            try:
                cfg = LMConfig(vocab_size=a.vocab, width=a.width, num_layers=a.layers, num_heads=a.heads,
                               mixers="lact", mixer_options={"lact": opts}, mode=mode)
            except ValueError as e:
                print(f"| {preset} | {mode} | — | — | — | ({e}) |")
                continue
            model = LanguageModel(cfg, rngs=nnx.Rngs(0))
            form = model.blocks[0].mixer._form
            graphdef, params = nnx.split(model)
            t = timeit(step_fn(graphdef), params, tokens, repeats=a.reps)
            first, best = t["compile"], t["best"]
            tps = a.batch * a.seq / best
            rows.append(dict(preset=preset, mode=mode, form=form, first_s=first, step_s=best, tokens_per_s=tps))
            print(f"| {preset} | {mode} | {form} | {first:.1f} | {best * 1e3:.1f} | {tps:,.0f} |", flush=True)
    m = machine(start)
    print(f"\n{describe(m)}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(dict(config=dict(width=a.width, layers=a.layers, heads=a.heads, seq=a.seq, batch=a.batch,
                                   vocab=a.vocab, chunk=a.chunk, window=a.window, dtype="float32",
                                   reps=a.reps,
                                   note="forward + backward (value_and_grad of the LM loss), no optimiser; "
                                        "best of reps after one compile/warm-up step; the machine may be "
                                        "shared with other jobs, see machine.loadavg_start/end"),
                       machine=m, results=rows), fh, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
