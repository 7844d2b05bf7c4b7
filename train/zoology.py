"""``python -m train.zoology``: the Zoology MQAR sweep (Arora et al. 2023, "Zoology: Measuring
and Improving Recall in Efficient Language Models", Fig. 2) at CPU scale.

What is the same as Zoology's Fig. 2 recipe:

* data: the Zoology MQAR construction (``train/mqar.py``, ``protocol="zoology"``: distinct
  keys from ``[1, V/2)`` and values from ``[V/2, V)``, the query region holds only the query
  keys each followed by 0, power-law gaps ``a = 0.01``, scored at the query keys only),
  vocabulary 8192, settings ``(L, kv)`` from ``(64, 4), (128, 8), (256, 16), (512, 64)``;
  a FIXED training set (examples ``0 .. train_examples-1`` of seed ``seed``) cycled in
  epochs (reshuffled with ``seed``), and a FIXED test set (examples ``0 .. test_examples-1``
  of seed ``seed + 10``; Zoology also uses ``seed + 10``). Zoology uses 100 000 training
  and 3 000 test examples per setting; the defaults here are smaller (see ``--help``).
* model: 2 blocks, a token mixer and the identity state mixer (``x + norm(x)``, no MLP),
  tied embedding head; the attention baseline is one head of full causal softmax attention
  with learned absolute positions and attention dropout 0.1 (``attn_dropout``, as Zoology's
  MHA); embedding dropout 0.1.
* training: AdamW, weight decay 0.1 on every parameter (as torch's AdamW), a cosine
  learning-rate schedule from the peak to 0, no warm-up (``--warmup N`` adds a linear one,
  not Zoology's), early stop once the held-out
  accuracy reaches 0.99; a learning-rate sweep, the best learning rate reported per
  (mixer, setting, width).

What differs (CPU budget): far fewer steps and examples, smaller batches, RMSNorm instead of
LayerNorm, the library's initialisation (LeCun-normal projections; Zoology draws every
linear layer from N(0, 0.02²)), evaluation every ``--eval-every`` steps instead of every
epoch. Every number it writes is measured; nothing is extrapolated.

Plain attention forms its induction head only after the learning rate has stayed near its peak
for thousands of steps (docs/recipes.md): ``--sweep attention-long`` runs its cells on a
15 000-step cosine ended by the early stop, and ``--steps-for attention=15000`` gives one preset
that budget inside any sweep (the cosine runs over each preset's own budget).

Outputs (``--out``, default ``runs/zoology/<name>``): ``results.json`` (every run: its
config, held-out accuracy curve, best accuracy, steps, wall time, recurrent state size),
``results.md`` (accuracy vs state size, best learning rate per cell) and ``accuracy.png``
(accuracy vs state size per setting, as Zoology plots it). ``--resume`` skips the runs
already in ``results.json``.

Mixer presets (``--mixers``): names of :data:`MIXER_PRESETS` (a registered mixer plus its
options); ``--preset NAME=MIXER[:JSON options]`` adds one (e.g.
``--preset lact16=lact:'{"chunk_size": 16}'``), and :func:`register_preset` does the same
from Python. The library's measured recall presets (``tttla_jax.nn.recipes.RECALL_PRESETS``)
appear as ``"<mixer>+recall"`` (:func:`add_recall_presets`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

VOCAB = 8192
SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))   # Zoology Fig. 2 (seq_len, kv pairs)
ZOOLOGY_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))  # Zoology's grid: 1e-4 .. 1e-2
TEST_SEED_OFFSET = 10


@dataclasses.dataclass(frozen=True)
class MixerPreset:
    """A token mixer of the sweep: registry name, its options, heads and whether the model
    gets learned absolute positions (Zoology gives them to attention only)."""
    mixer: str
    options: tuple = ()
    num_heads: int = 1
    learned_positions: bool = False

    def options_for(self, seq_len: int) -> dict:
        opts = dict(self.options)
        if self.mixer == "attention":
            opts.setdefault("max_len", seq_len)  # the KV cache holds the whole sequence
        return opts


def _p(mixer, num_heads=1, learned_positions=False, **options):
    return MixerPreset(mixer, tuple(sorted(options.items())), num_heads, learned_positions)


#: Named mixer presets of the sweep (``register_preset`` / ``--preset`` add more).
MIXER_PRESETS: dict = {
    "attention": _p("attention", learned_positions=True, use_bias=True, attn_dropout=0.1),
    # attention with the short-conv recall recipe (docs/recipes.md): the previous-token
    # information an induction head otherwise has to learn
    "attention+conv": _p("attention", learned_positions=True, use_bias=True, short_conv=4),
    "linear_attention": _p("linear_attention", feature_map="elu+1", chunk_size=32),
    "delta_net": _p("delta_net", chunk_size=32),
    "gated_delta_net": _p("delta_net", use_gate=True, chunk_size=32),
    "ttt_linear": _p("ttt_linear", mini_batch_size=16),
    "lact": _p("lact", preset="v0", chunk_size=16, window=16),
    # LaCT with the short conv and a chunk of 8 but RoPE on the fast q/k and the window branch
    # kept: still at chance at step 200 (docs/recipes.md); the LaCT recall preset drops both
    # (``lact+recall``, from tttla_jax.nn.recipes.RECALL_PRESETS)
    "lact+conv": _p("lact", preset="v0", chunk_size=8, window=16, short_conv=4),
    "swa": _p("swa", window=16),
    "titans": _p("titans", chunk_size=16),
}


def register_preset(name: str, mixer: str, options: Optional[dict] = None, *, num_heads: int = 1,
                    learned_positions: bool = False) -> MixerPreset:
    """Add (or replace) a named mixer preset of the sweep; the mixer and its options are
    validated by building a tiny model."""
    from tttla_jax.nn import MIXERS
    if mixer not in MIXERS:
        raise ValueError(f"mixer: unknown mixer {mixer!r} for preset {name!r}, expected one of "
                         f"{tuple(MIXERS)}")
    if not isinstance(options or {}, dict):
        raise ValueError(f"options: expected a dict of mixer options, got {options!r}")
    preset = MixerPreset(mixer, tuple(sorted((options or {}).items())), int(num_heads),
                         bool(learned_positions))
    if MIXER_PRESETS.get(name) == preset:   # already registered (and validated) as is
        return preset
    lm_config(preset, seq_len=64, width=16 * preset.num_heads, vocab_size=64)  # validates
    MIXER_PRESETS[name] = preset
    return preset


#: Smaller-state variants of the recall presets, for accuracy against state size (Zoology's
#: Fig. 2 axis): name -> (mixer, options changed from ``"<mixer>+recall"``, num_heads).
#: LaCT: a smaller SwiGLU hidden dim ``dh = inter_multi · 64`` at width 64 (``-dh8`` has
#: DeltaNet's state, 4 704 floats/layer); TTT-Linear: more, smaller heads (``-h4``: 4 604)
#: or a mini-batch of 1, which has no write buffer (``-mb1``, with a larger inner lr: 4 736;
#: ``-mb1-nobias`` without the fast bias: DeltaNet's 4 672).
#: Measured in docs/recipes.md ("Recall against state size").
RECALL_SIZE_VARIANTS: dict = {
    "lact+recall-dh8": ("lact", {"inter_multi": 0.125}, 1),
    "lact+recall-dh16": ("lact", {"inter_multi": 0.25}, 1),
    "lact+recall-dh32": ("lact", {"inter_multi": 0.5}, 1),
    "ttt_linear+recall-h2": ("ttt_linear", {}, 2),
    "ttt_linear+recall-h4": ("ttt_linear", {}, 4),
    "ttt_linear+recall-mb1": ("ttt_linear", {"mini_batch_size": 1, "base_lr": 8.0}, 1),
    # the same without the fast bias b (f(x) = x + LN(x W)): DeltaNet's 4 672 floats exactly
    "ttt_linear+recall-mb1-nobias": ("ttt_linear", {"mini_batch_size": 1, "base_lr": 8.0,
                                                    "fast_bias": False}, 1),
}


def add_recall_presets() -> list:
    """Register ``"<mixer>+recall"`` for every entry of the library's measured recall presets
    (``tttla_jax.nn.recipes.RECALL_PRESETS``: mixer -> options, docs/recipes.md), on top of
    the sweep's own options for that mixer, and their smaller-state variants
    (:data:`RECALL_SIZE_VARIANTS`); returns the names added."""
    try:
        from tttla_jax.nn.recipes import RECALL_PRESETS
    except ImportError:
        return []
    added = []
    for mixer, opts in RECALL_PRESETS.items():
        base = next((p for p in MIXER_PRESETS.values() if p.mixer == mixer), None)
        merged = {**(dict(base.options) if base else {}), **dict(opts)}
        name = f"{mixer}+recall"
        register_preset(name, mixer, merged, num_heads=base.num_heads if base else 1,
                        learned_positions=base.learned_positions if base else False)
        added.append(name)
    for name, (mixer, change, heads) in RECALL_SIZE_VARIANTS.items():
        full = MIXER_PRESETS.get(f"{mixer}+recall")
        if full is not None:
            register_preset(name, mixer, {**dict(full.options), **change}, num_heads=heads)
            added.append(name)
    return added


def lm_config(preset: MixerPreset, *, seq_len: int, width: int, vocab_size: int = VOCAB,
              embed_dropout: float = 0.1):
    """The Zoology model of ``preset``: 2 blocks, identity state mixer, tied head."""
    from tttla_jax.nn import LMConfig
    learned = preset.learned_positions
    return LMConfig(vocab_size=vocab_size, width=width, num_layers=2, num_heads=preset.num_heads,
                    mixers=preset.mixer, mixer_options={preset.mixer: preset.options_for(seq_len)},
                    state_mixer="identity", positions="learned" if learned else "none",
                    max_positions=seq_len if learned else None, embed_dropout=embed_dropout)


def state_size(model) -> int:
    """Recurrent state per layer in floats: the floating entries of a layer's decoding cache
    at batch 1 (fast weights, conv states, key/value caches; attention: ``2·L·H·D`` with the
    cache sized to the sequence), averaged over the layers."""
    import jax.numpy as jnp
    sizes = []
    for block in model.blocks:
        c = block.mixer.init_cache(1)
        sizes.append(sum(int(v.size) for v in c.values() if jnp.issubdtype(v.dtype, jnp.floating)))
    return int(round(sum(sizes) / len(sizes)))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One sweep. ``steps`` per run (the cosine runs over them), ``eval_every`` steps between
    held-out evaluations, early stop at ``early_stop`` accuracy."""

    def lrs_for(self, preset: str) -> tuple:
        """The learning rates swept for ``preset``: its ``preset_lrs`` entry, else ``lrs``."""
        return tuple(dict(self.preset_lrs).get(preset, self.lrs))

    def steps_for(self, preset: str) -> int:
        """The step budget of ``preset``'s runs (the cosine's length): its ``preset_steps``
        entry, else ``steps``."""
        return int(dict(self.preset_steps).get(preset, self.steps))
    mixers: tuple = ("attention", "linear_attention", "delta_net", "gated_delta_net")
    settings: tuple = ((64, 4),)
    widths: tuple = (64,)
    lrs: tuple = ZOOLOGY_LRS[2:]   # the two largest of Zoology's grid: 2.2e-3, 1e-2
    #: per-preset learning rates ``((preset, (lr, ...)), ...)`` replacing ``lrs`` for that
    #: preset (``--lrs`` on the command line clears them)
    preset_lrs: tuple = ()
    steps: int = 2000
    #: per-preset step budgets ``((preset, steps), ...)`` replacing ``steps`` for that preset
    #: (``--steps-for PRESET=N``); the cosine runs over the preset's own budget
    preset_steps: tuple = ()
    #: linear warm-up steps from 0 to the peak learning rate before the cosine (Zoology: none)
    warmup: int = 0
    batch_size: int = 64
    train_examples: int = 50_000
    test_examples: int = 1_000
    eval_every: int = 250
    early_stop: float = 0.99
    weight_decay: float = 0.1
    embed_dropout: float = 0.1
    power_a: float = 0.01
    seed: int = 0
    vocab_size: int = VOCAB


def _sparse_forward(model, tokens, index, dropout_key):
    """Logits at the query positions ``index`` ``[B, Q]``: ``[B, Q, V]`` (the head at Q
    positions only), with embedding dropout, and the attention dropout of mixers that have
    one (``attn_dropout``), when ``dropout_key`` is given."""
    import jax
    import jax.numpy as jnp
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    x = model.embed_inputs(tokens, positions, dropout_key=dropout_key)
    for i, block in enumerate(model.blocks):
        drops = dropout_key is not None and getattr(block.mixer, "attn_dropout", 0.0) > 0
        x, _ = block(x, None, positions, None, jax.random.fold_in(dropout_key, i + 1) if drops else None)
    x = jnp.take_along_axis(x, index[..., None], axis=1)
    return model.embed.attend(model.final_norm(x)).astype(jnp.float32)


def _query_index(mask, kv):
    return np.argsort(~mask, axis=1, kind="stable")[:, :kv].astype(np.int32)


class _Runner:
    """Compiled train / eval steps for one model shape; the learning rate is an argument, so
    the learning-rate sweep reuses the compilation."""

    def __init__(self, model, cfg: SweepConfig, kv: int):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.init_params = params
        self.tx = optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
        gd, tx = self.graphdef, self.tx

        def loss_fn(params, inputs, index, targets, key):
            logits = _sparse_forward(nnx.merge(gd, params), inputs, index, key)
            logp = jax.nn.log_softmax(logits, -1)
            nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
            acc = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
            return jnp.mean(nll), acc

        def train_step(params, opt_state, lr, inputs, index, targets, key):
            (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, index, targets, key)
            opt_state.hyperparams["learning_rate"] = lr
            upd, new_opt = tx.update(g, opt_state, params)
            new_params = optax.apply_updates(params, upd)
            finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(g))
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
            return keep(new_params, params), keep(new_opt, opt_state), loss, acc, finite

        def eval_step(params, inputs, index, targets):
            logits = _sparse_forward(nnx.merge(gd, params), inputs, index, None)
            return jnp.sum((jnp.argmax(logits, -1) == targets).astype(jnp.float32))

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_step = jax.jit(eval_step)


def _batches(data, kv):
    idx = _query_index(data["mask"], kv)
    tgt = np.take_along_axis(data["targets"], idx, axis=1)
    return data["inputs"], idx, tgt


def run_one(runner: _Runner, cfg: SweepConfig, lr: float, train, test, kv: int, progress=None) -> dict:
    """Train one (model, lr) from the runner's initial parameters; returns its record."""
    import jax
    import jax.numpy as jnp
    params = jax.tree.map(jnp.copy, runner.init_params)
    opt_state = runner.tx.init(params)
    tin, tidx, ttgt = train
    ein, eidx, etgt = test
    n = len(tin)
    order_rng = np.random.default_rng(cfg.seed)
    perm, pos = order_rng.permutation(n), 0
    key = jax.random.key(cfg.seed + 1)
    curve, t0, c0 = [], time.perf_counter(), time.process_time()
    loss = acc = float("nan")
    stopped, skipped = False, 0

    def evaluate():
        correct = 0.0
        bs = max(cfg.batch_size, 256)
        for s in range(0, len(ein), bs):
            correct += float(runner.eval_step(params, jnp.asarray(ein[s:s + bs]), jnp.asarray(eidx[s:s + bs]),
                                              jnp.asarray(etgt[s:s + bs])))
        return correct / (len(ein) * kv)

    step = 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:  # next epoch of the fixed training set
            perm, pos = order_rng.permutation(n), 0
        b = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        lr_t = _lr_at(lr, step, cfg.steps, cfg.warmup)
        params, opt_state, l_, a_, fin = runner.train_step(
            params, opt_state, jnp.float32(lr_t), jnp.asarray(tin[b]), jnp.asarray(tidx[b]),
            jnp.asarray(ttgt[b]), jax.random.fold_in(key, step))
        if not bool(fin):
            skipped += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            loss, acc = float(l_), float(a_)
            ev = evaluate()
            try:
                load_now = os.getloadavg()[0]
            except OSError:
                load_now = None
            curve.append({"step": step, "train_loss": loss, "train_accuracy": acc, "accuracy": ev,
                          "time": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                          "load": load_now})
            if progress:
                progress(step, ev)
            if ev >= cfg.early_stop:
                stopped = True
                break
    return {"lr": lr, "steps": step, "max_steps": cfg.steps, "early_stopped": stopped, "skipped_steps": skipped,
            "accuracy": curve[-1]["accuracy"], "best_accuracy": max(c["accuracy"] for c in curve),
            "curve": curve, "seconds": time.perf_counter() - t0,
            # this process's CPU time (all threads) for the run: load-independent, unlike wall time
            "cpu_seconds": time.process_time() - c0}


def _lr_at(lr: float, step: int, steps: int, warmup: int = 0) -> float:
    """The learning rate of step ``step`` (1-based) of ``steps``: linear from ``lr / warmup``
    to ``lr`` over the first ``warmup`` steps, then a cosine from ``lr`` to 0 over the rest
    (with ``warmup = 0``, Zoology's schedule: the cosine over the whole run)."""
    if step <= warmup:
        return lr * step / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))


def _run_key(mixer, L, kv, width, lr):
    return f"{mixer}|L{L}|kv{kv}|w{width}|lr{lr:.3g}"


def sweep(cfg: SweepConfig, out: str, *, resume: bool = False, log=print, bar: bool = True) -> dict:
    """Run the sweep; writes ``results.json`` after every run, then ``results.md`` and
    ``accuracy.png`` (needs matplotlib). Returns the results dict."""
    import jax
    from flax import nnx
    from tttla_jax.nn import LanguageModel
    from tttla_jax.train.mqar import mqar_batch

    for m in cfg.mixers:
        if m not in MIXER_PRESETS:
            raise ValueError(f"mixers: unknown preset {m!r}, expected names from {tuple(MIXER_PRESETS)} "
                             f"(or add one with --preset NAME=MIXER:JSON)")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = {"config": dataclasses.asdict(cfg), "runs": []}
    if resume and os.path.exists(path):
        with open(path) as f:
            results["runs"] = json.load(f).get("runs", [])
        log(f"--resume: {len(results['runs'])} runs already in {path}")
    done = {r["key"] for r in results["runs"]}
    results["presets"] = {m: dataclasses.asdict(MIXER_PRESETS[m]) for m in cfg.mixers}
    try:
        results["load_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    for m, n in cfg.preset_steps:
        if not isinstance(n, int) or isinstance(n, bool) or n <= cfg.warmup:
            raise ValueError(f"preset_steps: expected an int above warmup = {cfg.warmup} for preset "
                             f"{m!r}, got {n!r}")
    total = len(cfg.settings) * len(cfg.widths) * sum(len(cfg.lrs_for(m)) for m in cfg.mixers)
    i, t_sweep = 0, time.perf_counter()
    with jax.enable_x64(False):
        for (L, kv) in cfg.settings:
            kw = dict(seq_len=L, num_kv=kv, vocab_size=cfg.vocab_size, power_a=cfg.power_a,
                      protocol="zoology")
            train = _batches(mqar_batch(cfg.seed, range(cfg.train_examples), **kw), kv)
            test = _batches(mqar_batch(cfg.seed + TEST_SEED_OFFSET, range(cfg.test_examples), **kw), kv)
            for mixer in cfg.mixers:
                run_cfg = dataclasses.replace(cfg, steps=cfg.steps_for(mixer))
                for width in cfg.widths:
                    preset = MIXER_PRESETS[mixer]
                    runner = None
                    for lr in cfg.lrs_for(mixer):
                        i += 1
                        key = _run_key(mixer, L, kv, width, lr)
                        if key in done:
                            continue
                        if runner is None:
                            model = LanguageModel(lm_config(preset, seq_len=L, width=width,
                                                            vocab_size=cfg.vocab_size,
                                                            embed_dropout=cfg.embed_dropout),
                                                  rngs=nnx.Rngs(cfg.seed))
                            runner = _Runner(model, cfg, kv)
                            n_params = sum(int(p.size) for p in jax.tree.leaves(runner.init_params))
                            ssize = state_size(model)
                        label = f"[{i}/{total}] {mixer} L={L} kv={kv} width={width} lr={lr:.2g}"

                        def progress(step, acc, label=label):
                            if bar:
                                el = time.perf_counter() - t_sweep
                                try:
                                    load_now = f", load {os.getloadavg()[0]:.1f}"
                                except OSError:
                                    load_now = ""
                                print(f"{label} step {step}/{run_cfg.steps} test acc {acc:.3f} "
                                      f"(sweep {el / 60:.1f} min, process CPU {time.process_time():.0f} s"
                                      f"{load_now})", file=sys.stderr, flush=True)

                        rec = run_one(runner, run_cfg, lr, train, test, kv, progress)
                        try:
                            load = os.getloadavg()[0]
                        except OSError:
                            load = None
                        rec.update({"key": key, "mixer": mixer, "base_mixer": preset.mixer,
                                    "seq_len": L, "num_kv": kv, "width": width,
                                    "state_size": ssize, "n_params": n_params, "load": load})
                        results["runs"].append(rec)
                        log(f"{label}: accuracy {rec['accuracy']:.4f} after {rec['steps']} steps "
                            f"({rec['seconds']:.1f} s{', early stop' if rec['early_stopped'] else ''}); "
                            f"state {ssize} floats/layer")
                        _write_json(path, results)
    results["sweep_seconds"] = time.perf_counter() - t_sweep
    _write_json(path, results)
    md = markdown_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    png = os.path.join(out, "accuracy.png")
    if plot(results, png):
        results["plot"] = png
    log(md)
    log(f"results: {path}, {os.path.join(out, 'results.md')}" + (f", {png}" if "plot" in results else ""))
    return results


def merge(dirs, out: str, log=print) -> dict:
    """Combine the runs of several sweep directories (e.g. runs started in parallel) into
    ``out``: ``results.json`` (runs in order, each directory's config under ``"parts"``),
    ``results.md`` and ``accuracy.png``. Later directories win for a repeated run key."""
    runs, parts = {}, []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.exists(path):
            raise ValueError(f"merge: no results.json in {d!r}")
        with open(path) as f:
            res = json.load(f)
        parts.append({"dir": d, "config": res["config"], "sweep_seconds": res.get("sweep_seconds"),
                      "load_at_start": res.get("load_at_start")})
        for r in res["runs"]:
            runs[r["key"]] = r
    results = {"config": parts[0]["config"], "parts": parts, "runs": list(runs.values())}
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "results.json"), results)
    md = markdown_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(out, "accuracy.png"))
    log(md)
    return results


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def best_runs(results: dict) -> list:
    """The best learning rate per (mixer, setting, width): the run with the highest final
    held-out accuracy (ties: fewer steps)."""
    best = {}
    for r in results["runs"]:
        k = (r["mixer"], r["seq_len"], r["num_kv"], r["width"])
        if k not in best or (r["accuracy"], -r["steps"]) > (best[k]["accuracy"], -best[k]["steps"]):
            best[k] = r
    return [best[k] for k in sorted(best, key=lambda k: (k[1], k[0], k[3]))]


def markdown_table(results: dict) -> str:
    """Accuracy (best learning rate) with the state size, one row per (setting, mixer, width)."""
    cfg = results["config"]
    lines = [f"MQAR (Zoology protocol), vocab {cfg['vocab_size']}, {cfg['train_examples']} train / "
             f"{cfg['test_examples']} test examples, batch {cfg['batch_size']}, at most {cfg['steps']} "
             f"steps (early stop at {cfg['early_stop']}), learning rates {list(cfg['lrs'])}"
             + "".join(f"; {m}: {list(v)}" for m, v in cfg.get("preset_lrs", ())) + "."
             + "".join(f" {m}: at most {n} steps." for m, n in cfg.get("preset_steps", ())),
             "",
             "| L | kv | mixer | width | state (floats/layer) | params | test accuracy | best lr | steps | wall s (load) | CPU s | all lrs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in results["runs"]:
        by.setdefault((r["mixer"], r["seq_len"], r["num_kv"], r["width"]), []).append(r)
    for b in best_runs(results):
        load = "" if b.get("load") is None else f" ({b['load']:.0f})"
        alls = ", ".join(f"{r['lr']:.2g}: {r['accuracy']:.3f}"
                         for r in sorted(by[(b['mixer'], b['seq_len'], b['num_kv'], b['width'])],
                                         key=lambda r: r["lr"]))
        lines.append(f"| {b['seq_len']} | {b['num_kv']} | {b['mixer']} | {b['width']} | {b['state_size']} | "
                     f"{b['n_params']} | {b['accuracy']:.3f} | {b['lr']:.2g} | {b['steps']}"
                     f"{' (early stop)' if b['early_stopped'] else ''} | {b['seconds']:.0f}{load} | "
                     f"{'—' if b.get('cpu_seconds') is None else format(b['cpu_seconds'], '.0f')} | {alls} |")
    if "sweep_seconds" in results:
        load = results.get("load_at_start")
        lines += ["", f"Sweep wall time {results['sweep_seconds'] / 60:.1f} min"
                  + (f" (load average {load:.1f} at start)" if load is not None else "") + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> bool:
    """Accuracy vs state size (log x), one panel per setting, one marker series per mixer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[train]'); skipping the plot")
        return False
    best = best_runs(results)
    settings = sorted({(r["seq_len"], r["num_kv"]) for r in best})
    if not settings:
        return False
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False)
    mixers = sorted({r["mixer"] for r in best})
    for ax, (L, kv) in zip(axes[0], settings):
        for m in mixers:
            pts = sorted((r["state_size"], r["accuracy"]) for r in best
                         if r["mixer"] == m and (r["seq_len"], r["num_kv"]) == (L, kv))
            if pts:
                ax.plot(*zip(*pts), "o-", label=m)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"L={L}, kv={kv}")
        ax.set_xlabel("state size (floats per layer)")
        ax.set_ylabel("MQAR test accuracy")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


#: The default sweep: one setting, so that it fits about half an hour of a 2-core CPU (its
#: runs' CPU times are in docs/recipes.md); ``--settings 64x4 128x8`` adds Zoology's second
#: setting (about twice the time). LaCT runs as its smaller-state preset ``lact+recall-dh16``
#: (the full-state ``lact+recall`` costs 11 CPU-min at L = 64 alone); TTT-Linear's recall
#: preset at DeltaNet's state (``-h4``) and at its own.
DEFAULT = SweepConfig(
    mixers=("attention", "attention+conv", "linear_attention", "delta_net", "gated_delta_net",
            "ttt_linear+recall-h4", "ttt_linear+recall", "lact+recall-dh16"),
    settings=((64, 4),), widths=(64,), lrs=(1e-2,),
    preset_lrs=(("attention", (3e-3,)), ("attention+conv", (3e-3,)), ("lact", (3e-3,)),
                ("lact+conv", (3e-3,))),
    steps=600, eval_every=100, train_examples=40_000)
TINY = SweepConfig(mixers=("attention", "linear_attention"), settings=((16, 2),), widths=(16,), lrs=(3e-3,),
                   preset_lrs=(("linear_attention", (1e-2,)),),
                   steps=4, batch_size=8, train_examples=64, test_examples=16, eval_every=2,
                   vocab_size=64)
FULL = SweepConfig(mixers=tuple(MIXER_PRESETS), settings=SETTINGS, widths=(64, 128, 256, 512),
                   lrs=ZOOLOGY_LRS, steps=12_500, batch_size=512, train_examples=100_000,
                   test_examples=3_000, eval_every=200)
#: Plain attention's long budget (docs/recipes.md, "Attention: the induction-head plateau, and the conv as its recipe"): the
#: induction head forms only after the learning rate has stayed near its peak for thousands of
#: steps, so a 15 000-step cosine that the early stop at 0.99 ends well before its end; the
#: same data, model and optimiser as the default sweep. Settings (64, 4) and (128, 8) at widths 64 and 128.
ATTENTION_LONG = dataclasses.replace(DEFAULT, mixers=("attention",), settings=((64, 4), (128, 8)),
                                     widths=(64, 128), lrs=(3e-3,), preset_lrs=(), steps=15_000,
                                     eval_every=250)
SWEEPS = {"default": DEFAULT, "tiny": TINY, "full": FULL, "attention-long": ATTENTION_LONG}


def _settings(s: str):
    try:
        L, kv = s.lower().split("x")
        return int(L), int(kv)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a setting LxKV such as 64x4, got {s!r}") from None


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m train.zoology",
        description="Zoology MQAR sweep (Arora et al. 2023, Fig. 2): mixers x (L, kv) x width x lr, "
                    "Zoology's data construction, model (identity state mixer, learned positions for "
                    "attention, embedding dropout) and recipe (AdamW wd 0.1, cosine to 0, early stop "
                    "at 0.99). Writes results.json, results.md and accuracy.png.",
        epilog=f"Sweeps: default = {DEFAULT}; full = Zoology's scale (GPU-sized). Mixer presets: "
               + ", ".join(f"{k}={v.mixer}{dict(v.options)}" for k, v in MIXER_PRESETS.items()),
        allow_abbrev=False)
    p.add_argument("--sweep", choices=tuple(SWEEPS), default="default",
                   help="base sweep the other flags override [default]")
    p.add_argument("--mixers", nargs="+", help="mixer presets to run")
    p.add_argument("--preset", action="append", default=[], metavar="NAME=MIXER[:JSON]",
                   help="add a mixer preset, e.g. gdn2=delta_net:'{\"use_gate\": true}' "
                        "(the key \"num_heads\" sets the model's head count)")
    p.add_argument("--settings", nargs="+", type=_settings, help="(L, kv) settings as LxKV, e.g. 64x4 128x8")
    p.add_argument("--widths", nargs="+", type=int, help="model widths")
    p.add_argument("--lrs", nargs="+", type=float, help="peak learning rates")
    for name in ("steps", "batch_size", "train_examples", "test_examples", "eval_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--steps-for", action="append", default=[], metavar="PRESET=N",
                   help="step budget of one preset's runs (its cosine's length), e.g. "
                        "attention=15000 (plain attention's long budget); repeatable")
    p.add_argument("--warmup", type=int, help="linear warm-up steps before the cosine [0, as Zoology]")
    p.add_argument("--early-stop", type=float, help="held-out accuracy that ends a run [0.99]")
    p.add_argument("--out", default="", help="output directory [runs/zoology/<sweep>]")
    p.add_argument("--resume", action="store_true", help="skip the runs already in results.json")
    p.add_argument("--no-progress", action="store_true", help="no per-evaluation progress lines")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="train nothing: combine the results of these sweep directories into --out")
    return p


def parse(argv=None):
    """Parse the command line: ``(parser, args, SweepConfig)`` (usage errors exit)."""
    add_recall_presets()
    p = build_parser()
    a = p.parse_args(argv)
    for spec in a.preset:
        name, _, rest = spec.partition("=")
        mixer, _, js = rest.partition(":")
        try:
            opts = json.loads(js) if js else {}
            if not isinstance(opts, dict):
                raise ValueError(f"expected a JSON object of mixer options, got {js!r}")
            # "num_heads" is the preset's head count (LMConfig), not a mixer option
            heads = opts.pop("num_heads", 1)
            if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
                raise ValueError(f"num_heads: expected a positive int, got {heads!r}")
            register_preset(name, mixer, opts, num_heads=heads)
        except (ValueError, json.JSONDecodeError) as e:
            p.error(f"--preset {spec!r}: {e}")
    over = {}
    for name in ("mixers", "settings", "widths", "lrs", "steps", "warmup", "batch_size", "train_examples",
                 "test_examples", "eval_every", "seed", "early_stop"):
        v = getattr(a, name)
        if v is not None:
            over[name] = tuple(v) if isinstance(v, list) else v
    for name in ("steps", "batch_size", "train_examples", "test_examples", "eval_every"):
        if name in over and over[name] <= 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {over[name]}")
    if "early_stop" in over and not 0 < over["early_stop"] <= 1:
        p.error(f"--early-stop: expected an accuracy in (0, 1], got {over['early_stop']}")
    for name in ("lrs", "widths"):
        if name in over and not all(v > 0 and math.isfinite(v) for v in over[name]):
            p.error(f"--{name}: expected positive values, got {list(over[name])}")
    if "lrs" in over:
        over["preset_lrs"] = ()   # --lrs applies to every preset
    if a.steps_for:
        budgets = dict(SWEEPS[a.sweep].preset_steps)
        for spec in a.steps_for:
            name, _, n = spec.partition("=")
            if name not in MIXER_PRESETS:
                p.error(f"--steps-for {spec!r}: unknown preset {name!r}, expected one of "
                        f"{tuple(MIXER_PRESETS)}")
            try:
                budgets[name] = int(n)
            except ValueError:
                budgets[name] = 0
            if budgets[name] <= 0:
                p.error(f"--steps-for {spec!r}: expected PRESET=N with N a positive integer, got {n!r}")
        over["preset_steps"] = tuple(sorted(budgets.items()))
    cfg = dataclasses.replace(SWEEPS[a.sweep], **over)
    for name, n in (("steps", cfg.steps), *cfg.preset_steps):
        if not 0 <= cfg.warmup < n:
            p.error(f"--warmup: expected 0 <= warmup < steps = {n}"
                    + ("" if name == "steps" else f" (the budget of {name})") + f", got {cfg.warmup}")
    if cfg.batch_size > cfg.train_examples:
        p.error(f"--batch-size: expected at most train_examples = {cfg.train_examples}, got {cfg.batch_size}")
    return p, a, cfg


def main(argv=None) -> int:
    p, a, cfg = parse(argv)
    out = a.out or os.path.join("runs", "zoology", a.sweep)
    if a.merge:
        try:
            merge(a.merge, out)
        except ValueError as e:
            p.error(str(e))
        return 0
    try:
        sweep(cfg, out, resume=a.resume, bar=not a.no_progress)
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
