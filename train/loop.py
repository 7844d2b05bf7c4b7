"""The main training job: ``run(config)``.

Determinism (what makes kill + resume bitwise identical to an uninterrupted run): the
step is a pure jitted function of (parameters, optimiser state, batch); the batch order
is a function of the seed and the grain iterator state; all of these, the RNG key and
the step are in the checkpoint. Metrics records (``metrics.jsonl``) hold only values
computed from that state, except the wall-clock fields ``time`` and ``tokens_per_s``.
On resume, records after the restored step are dropped before training continues.

Never lies: every step reports whether its loss and gradient norm are finite (the
``finite`` flag); a non-finite step leaves parameters and optimiser state unchanged, and
with ``on_nonfinite="stop"`` (default) the run ends with :class:`NonFiniteError` naming
the step (``python -m train`` exits with status 3), before any checkpoint of that state;
with ``"skip"`` it continues and counts the step in the ``skipped_steps`` metric.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tttla_jax.nn.decode import generate
from tttla_jax.nn.model import LanguageModel, LMConfig, count_params
from tttla_jax.train import data as data_lib
from tttla_jax.train import distributed as dist
from tttla_jax.train.checkpoint import (Checkpointer, CheckpointWriteError, NonFiniteError,
                                        check_writable, describe_write_error, state_names)
from tttla_jax.train.config import STRUCTURAL, TrainConfig

WALL_CLOCK_FIELDS = ("time", "tokens_per_s")
MAX_CONSECUTIVE_SKIPS = 10  # --on-nonfinite skip still stops after this many in a row
SAMPLE_PROMPT = "The "


def _eprint(*a):
    print(*a, file=sys.stderr, flush=True)


def build_model(cfg: TrainConfig) -> LanguageModel:
    if cfg.task == "vit":  # a ViTClassifier (train/vit.py)
        from tttla_jax.train import vit
        return vit.build_model(cfg)
    opts = {}
    if "swa" in cfg.mixers:
        opts["swa"] = {"window": cfg.window}
    for m in ("delta_net", "linear_attention"):
        if m in cfg.mixers:
            opts[m] = {"chunk_size": cfg.chunk_size}
    if "lact" in cfg.mixers:
        opts["lact"] = {"preset": cfg.lact_preset, "chunk_size": cfg.chunk_size,
                        "window": cfg.lact_window or None, "base_lr": cfg.lact_base_lr}
    lm = LMConfig(vocab_size=cfg.vocab_size, width=cfg.width, num_layers=cfg.num_layers,
                  num_heads=cfg.num_heads, mixers=cfg.mixers, mixer_options=opts,
                  param_dtype=jnp.float32)
    return LanguageModel(lm, rngs=nnx.Rngs(cfg.seed))


def make_optimizer(cfg: TrainConfig):
    """AdamW with linear warm-up, cosine decay and global-norm clipping; decay on matrices."""
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    return tx, sched


def _masked_nll(logits, targets, mask):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    correct = ((jnp.argmax(logits, -1) == targets) & mask).astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(correct)


def sparse_logits(model: LanguageModel, tokens, index):
    """Logits only at ``index`` ([B, Q] positions): ``[B, Q, V]``.

    Same computation as ``model(tokens)[0]`` gathered at ``index`` (checked in the tests),
    but the tied head (the dominant cost at vocab 8192) runs on Q positions, not T. It
    mirrors :meth:`LanguageModel.__call__` (embed, blocks, final norm, ``embed.attend``).
    """
    B, T = tokens.shape
    cache = model.init_cache(B)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    x = model.embed_inputs(tokens, positions)
    for block, c in zip(model.blocks, cache["layers"]):
        x, _ = block(x, c, positions)
    x = jnp.take_along_axis(x, index[..., None], axis=1)
    logits = model.embed.attend(model.final_norm(x))
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _forward_loss(model, batch, sparse_queries: int):
    if "images" in batch:  # vit task: (sum NLL, images, correct) per image
        from tttla_jax.train import vit
        return vit.forward_loss(model, batch)
    if sparse_queries:  # MQAR: exactly `sparse_queries` scored positions per row
        mask = batch["mask"]
        index = jnp.argsort(~mask, axis=1, stable=True)[:, :sparse_queries].astype(jnp.int32)
        logits = sparse_logits(model, batch["inputs"], index)
        targets = jnp.take_along_axis(batch["targets"], index, axis=1)
        mask = jnp.take_along_axis(mask, index, axis=1)
    elif "cu_seqlens" in batch:  # packed documents: each row [1, T] with its own cu_seqlens
        logits = packed_logits(model, batch["inputs"], batch["cu_seqlens"])
        targets, mask = batch["targets"], batch["mask"]
    else:
        logits, _ = model(batch["inputs"])
        targets, mask = batch["targets"], batch["mask"]
    return _masked_nll(logits, targets, mask)


def packed_logits(model: LanguageModel, tokens, cu_seqlens):
    """Logits ``[B, T, V]`` of B rows of packed documents (``cu_seqlens`` ``[B, N + 1]``, one
    row each): ``jax.vmap`` over the rows of the functional (``nnx.split`` / ``merge``) call
    ``model(row[None], cu_seqlens=cu)``, so the batch axis (and its data/fsdp sharding)
    stays as it is."""
    graphdef, state = nnx.split(model)

    def row(state, tok, cu):
        return nnx.merge(graphdef, state)(tok[None], cu_seqlens=cu)[0][0]

    return jax.vmap(row, in_axes=(None, 0, 0))(state, tokens, cu_seqlens)


_STEP_CACHE: dict = {}


def make_steps(graphdef, cfg: TrainConfig, mesh=None, shardings=None):
    """Jitted ``train_step(params, rest, opt_state, batch)`` and ``eval_step(params, rest,
    batch)``, cached per (model graph, optimiser settings, mesh) so repeated runs in one
    process (tests, resumes) reuse the compiled code.

    With ``shardings = (params, rest, opt_state, batch)`` (NamedSharding trees on ``mesh``)
    the steps are jitted with those ``in_shardings`` / ``out_shardings`` (metrics
    replicated): the SPMD partitioner inserts the FSDP all-gathers and the gradient
    reductions over ``("data", "fsdp")``.
    """
    opt_fields = ("lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "b1", "b2", "grad_clip")
    sparse = cfg.mqar_kv if cfg.task == "mqar" else 0
    key = (graphdef, sparse, tuple(getattr(cfg, f) for f in opt_fields),
           None if mesh is None else dist.mesh_key(mesh))
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    tx, _ = make_optimizer(cfg)

    def model_sums(params, rest, batch, sparse=sparse):
        return _forward_loss(nnx.merge(graphdef, params, rest), batch, sparse)

    if mesh is not None and dist.seq_size(mesh) > 1:  # every sequence split over "seq"
        # the dense loss (sparse_logits gathers along T): the same sum, every row scoring
        # exactly its masked positions
        model_sums = dist.sequence_parallel_loss(lambda p, r, b: _forward_loss(
            nnx.merge(graphdef, p, r), b, 0), mesh)

    def loss_fn(params, rest, batch):
        s, n, c = model_sums(params, rest, batch)
        return s / jnp.maximum(n, 1.0), (n, c)

    def train_step(params, rest, opt_state, batch):
        (loss, (n, c)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # a non-finite step changes nothing (jnp.where with a true flag is exact)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
        metrics = {"loss": loss, "grad_norm": gnorm, "accuracy": c / jnp.maximum(n, 1.0),
                   "finite": finite}
        return params, opt_state, metrics

    def eval_step(params, rest, batch):
        return model_sums(params, rest, batch)

    if shardings is None:
        train_step, eval_step = jax.jit(train_step), jax.jit(eval_step)
    else:
        p_sh, r_sh, o_sh, b_sh = shardings
        rep = dist.replicated(mesh)
        train_step = jax.jit(train_step, in_shardings=(p_sh, r_sh, o_sh, b_sh),
                             out_shardings=(p_sh, o_sh, rep))
        eval_step = jax.jit(eval_step, in_shardings=(p_sh, r_sh, b_sh), out_shardings=rep)
    _STEP_CACHE[key] = (train_step, eval_step)
    return train_step, eval_step


def evaluate(eval_step, params, batches) -> dict:
    s = n = c = 0.0
    for b in batches:
        bs, bn, bc = eval_step(params, {k: jnp.asarray(v) for k, v in b.items()})
        s, n, c = s + float(bs), n + float(bn), c + float(bc)
    loss = s / max(n, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_accuracy": c / max(n, 1.0)}


class Progress:
    """A plain-text progress bar on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = None
        self.last = 0.0

    def update(self, step: int, loss: float, tok_s: float, force: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.s0 = now, step
        if not force and now - self.last < (0.25 if self.tty else 5.0):
            return
        self.last = now
        done = step - self.s0
        rate = done / (now - self.t0) if now > self.t0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac = step / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        eta_s = "?" if math.isnan(eta) else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        line = (f"step {step:>6d}/{self.total} [{bar}] loss {loss:.4f} "
                f"{tok_s / 1e3:7.1f}k tok/s ETA {eta_s}")
        if self.tty:
            sys.stderr.write("\r" + line)
            if force:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _write_jsonl_atomic(path: str, records: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str, log=_eprint) -> list:
    """The records of ``metrics.jsonl``; damaged lines are skipped with a warning."""
    if not os.path.exists(path):
        return []
    out, bad = [], []
    with open(path, errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):  # a torn line from a kill, or a damaged one
                bad.append(lineno)
                continue
            out.append(rec)
    if bad:
        log(f"warning: {path}: skipped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}); kept the {len(out)} other records")
    return out


def plot_metrics(records: list, path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[train]'); skipping the loss plot")
        return False
    tr = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) according to ``cfg``; returns a summary dict.

    Runs with 64-bit types disabled (the default jax setting) whatever the caller's
    setting, so a run inside a float64 test session is the same as on the command line.
    """
    if cfg.tune_malloc:
        from tttla_jax.host import tune_malloc
        tune_malloc()
    with jax.enable_x64(False):
        return _run(cfg, log)


def resolve_run_dir(cfg: TrainConfig, log=print) -> str:
    """The run directory: ``--ckpt-dir`` as given, else ``runs/<preset>``.

    Without ``--ckpt-dir`` the command just works when repeated: if ``runs/<preset>``
    already holds checkpoints, a new run goes to the first free ``runs/<preset>-2``,
    ``-3``, ...; ``--resume`` continues the newest of them that holds a checkpoint (a
    newer directory without one, e.g. a run killed before its first checkpoint, is
    passed over, and the log says so). With an explicit ``--ckpt-dir`` that holds
    checkpoints, ``--resume`` is required (an error otherwise).
    """
    if cfg.ckpt_dir:
        return cfg.ckpt_dir
    base = cfg.run_dir

    def has_ckpt(d):
        c = os.path.join(d, "ckpt")
        return os.path.isdir(c) and any(n.isdigit() for n in os.listdir(c))

    candidates = [base] + [f"{base}-{i}" for i in range(2, 10_000)]
    if cfg.resume:
        existing = [d for d in candidates if os.path.isdir(d)]
        with_ckpt = [d for d in existing if has_ckpt(d)]
        if not with_ckpt:
            log(f"--resume: no run directory {base}[-N] holds a checkpoint: starting in {base}")
            return base
        chosen = with_ckpt[-1]
        newer = existing[existing.index(chosen) + 1:]
        why = "the newest run directory that holds a checkpoint"
        if newer:
            why += f"; newer {', '.join(newer)} hold{'s' if len(newer) == 1 else ''} none"
        log(f"--resume: resuming {chosen} ({why}; --ckpt-dir picks another)")
        return chosen
    used = []
    for d in candidates:
        if not has_ckpt(d):
            break
        used.append(d)
    free = candidates[len(used)]
    if used:
        log(f"note: {used[-1]} holds an earlier run; this run writes to {free} "
            f"(--resume continues the most recent run; --ckpt-dir picks a directory)")
    return free


def _run(cfg: TrainConfig, log) -> dict:
    pid, nproc = jax.process_index(), jax.process_count()
    lead = pid == 0
    if not lead:  # only process 0 talks, writes metrics and plots
        log = lambda *a, **k: None  # noqa: E731
    mesh = dist.make_mesh(cfg.mesh)
    shards = dist.batch_shards(mesh)
    # which rows of every global batch this process reads (processes along "seq" share rows)
    block, blocks = dist.process_row_block(mesh)
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size: expected a multiple of the mesh's data x fsdp = {shards} "
                         f"devices, got {cfg.batch_size}")
    run_dir = resolve_run_dir(cfg, log)
    if nproc > 1:  # every process must use process 0's choice
        from jax.experimental import multihost_utils
        idx = np.asarray([(["", *[f"-{i}" for i in range(2, 10_000)]]).index(
            run_dir[len(cfg.run_dir):]) if not cfg.ckpt_dir else 0], np.int32)
        idx = int(multihost_utils.broadcast_one_to_all(idx)[0])
        if not cfg.ckpt_dir:
            run_dir = cfg.run_dir + ("" if idx == 0 else f"-{idx + 1}")
    check_writable(run_dir)  # fails here, before anything is compiled or trained
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    ckpt = Checkpointer(run_dir, keep=cfg.keep, log=log)
    try:
        ckpt.clean_tmp()
        existing = ckpt.steps()
        if existing and not cfg.resume:
            raise SystemExit(
                f"error: {os.path.abspath(run_dir)} already holds checkpoints (steps {existing}); "
                f"pass --resume to continue that run, or --ckpt-dir to start a new one")

        model = build_model(cfg)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx, sched = make_optimizer(cfg)
        p_sh = dist.param_shardings(params, mesh)
        r_sh = dist.state_shardings(rest, mesh)
        rep = dist.replicated(mesh)
        # packed rows carry cu_seqlens [B, N + 1]: rows stay whole over "seq" (split in the loss)
        b_sh = dist.batch_sharding(mesh, None if (cfg.task == "lm" and cfg.pack_documents) else cfg.seq_len)
        # place the initial state on the mesh (a jitted identity also works multi-process)
        params = jax.jit(lambda x: x, out_shardings=p_sh)(params)
        rest = jax.jit(lambda x: x, out_shardings=r_sh)(rest)
        o_sh = dist.opt_shardings(tx, jax.eval_shape(tx.init, params), p_sh, mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        rng = jax.jit(lambda: jax.random.key_data(jax.random.key(cfg.seed)), out_shardings=rep)()
        state = (params, opt_state, rng)
        leaves, treedef = jax.tree.flatten(state)
        names = state_names(state)
        state_sh = jax.tree.leaves((p_sh, o_sh, rep))
        if len(state_sh) != len(leaves):
            raise AssertionError(f"{len(state_sh)} shardings for {len(leaves)} state arrays")
        it = iter(data_lib.train_loader(cfg, block, blocks))
        start, records, skipped = 0, [], 0

        if cfg.resume:
            like = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) for x, sh in zip(leaves, state_sh)]
            found = ckpt.restore_latest(like, log=log, names=names)
            if found is None:
                if existing:
                    log("no valid checkpoint left to resume from: starting from step 0")
                else:
                    log(f"--resume: no checkpoint in {ckpt.root}: starting from step 0")
            else:
                start, rleaves, meta = found
                saved = meta.get("config", {})
                # a field newer than the checkpoint counts as its default (e.g. mqar_protocol)
                diff = [k for k in STRUCTURAL
                        if json.dumps(saved.get(k, _jsonable(getattr(TrainConfig, k, None))))
                        != json.dumps(_jsonable(getattr(cfg, k)))]
                if diff:
                    raise SystemExit(
                        "error: --resume with a different config: " + ", ".join(
                            f"{k}={saved.get(k)!r} in the checkpoint vs {getattr(cfg, k)!r}" for k in diff))
                state = jax.tree.unflatten(treedef, rleaves)
                it.set_state(dist.data_state_to_local(meta["data_state"], block, blocks))
                skipped = int(meta.get("skipped_steps", 0))
                records = [r for r in read_metrics(metrics_path, log) if r.get("step", 0) <= start]
                saved_steps = saved.get("steps")
                if start >= cfg.steps:
                    log(f"run {run_dir} is finished: its newest checkpoint is step {start} and --steps "
                        f"is {cfg.steps}; nothing to train. To continue it: --resume --steps N with "
                        f"N > {start} (the learning-rate schedule is then recomputed for N steps)")
                    final_eval = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
                    return {"step": start, "start_step": start, "run_dir": run_dir, "finished": True,
                            "metrics_path": metrics_path, "final_eval": final_eval,
                            "checkpoints": ckpt.steps(), "params": state[0], "mesh": dict(mesh.shape),
                            "process_count": nproc, "skipped_steps": skipped}
                log(f"resumed from step {start} ({os.path.join(ckpt.root, str(start))})")
                if saved_steps is not None and saved_steps != cfg.steps:
                    what = ("extending the finished run" if start >= saved_steps
                            else "changing the run's length")
                    log(f"note: {what} from {saved_steps} to {cfg.steps} steps (--steps): the "
                        f"learning-rate schedule from step {start} on is the one of a "
                        f"{cfg.steps}-step run")
        if lead:
            _write_jsonl_atomic(metrics_path, records)
        params, opt_state, rng = state

        n_params = count_params(model)
        mesh_s = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
        mixer_names = ["vit3"] * cfg.num_layers if cfg.task == "vit" else list(cfg.mixers)
        log(f"model: {cfg.num_layers} layers {mixer_names}, width {cfg.width}, "
            f"{n_params / 1e6:.3f}M parameters; task {cfg.task}; steps {cfg.steps}; run dir {run_dir}")
        if mesh.size > 1 or nproc > 1:
            log(f"mesh: {mesh_s} over {mesh.size} devices, {nproc} process(es)")
        train_step, eval_step = make_steps(graphdef, cfg, mesh, (p_sh, r_sh, o_sh, b_sh))
        eval_fn = lambda p, b: eval_step(p, rest, b)
        evals = [dist.global_batch(dist.process_rows(data_lib.pad_batch(b, cfg.batch_size), block,
                                                     blocks), b_sh, cfg.batch_size)
                 for b in data_lib.eval_batches(cfg)]
        tokens_per_step = cfg.batch_size * cfg.seq_len
        if cfg.task == "vit":  # patch tokens
            from tttla_jax.train import vit
            tokens_per_step = cfg.batch_size * vit.tokens_per_image(cfg)
        progress = Progress(cfg.steps, start, cfg.progress and lead)
        t_start = time.perf_counter()
        f = open(metrics_path, "a") if lead else None

        def emit(rec):
            if f is not None:
                try:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                except OSError as e:
                    raise CheckpointWriteError(
                        f"writing {metrics_path} failed at step {rec.get('step')} "
                        f"({describe_write_error(e)}); checkpoints (steps {ckpt.steps()}) are "
                        f"intact: free space or fix the directory, then rerun with --resume") from None
            records.append(rec)

        def save(step):
            flat = jax.tree.leaves((params, opt_state, rng))
            ckpt.save(step, flat, {"config": _jsonable(dataclasses.asdict(cfg)),
                                   "data_state": dist.data_state_to_global(it.get_state(), block, blocks),
                                   "skipped_steps": skipped}, names=names)

        step, consecutive = start, 0
        t_last, s_last = time.perf_counter(), start
        while step < cfg.steps:
            batch = dist.global_batch(next(it), b_sh, cfg.batch_size)
            params, opt_state, m = train_step(params, rest, opt_state, batch)
            step += 1
            if not bool(m.pop("finite")):  # parameters and optimiser state were left unchanged
                skipped += 1
                consecutive += 1
                what = f"loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])}"
                emit({"kind": "nonfinite", "step": step, "loss": float(m["loss"]),
                      "grad_norm": float(m["grad_norm"]), "skipped_steps": skipped,
                      "time": time.perf_counter() - t_start})
                if cfg.on_nonfinite == "stop" or consecutive >= MAX_CONSECUTIVE_SKIPS:
                    why = ("--on-nonfinite stop" if cfg.on_nonfinite == "stop"
                           else f"{consecutive} non-finite steps in a row")
                    raise NonFiniteError(
                        f"step {step}: non-finite training step ({what}); run stopped ({why}); "
                        f"last checkpoint: steps {ckpt.steps()} in {ckpt.root}, none written after "
                        f"it. Lower --lr, or pass --on-nonfinite skip to skip such steps")
                log(f"warning: step {step}: non-finite training step ({what}) skipped "
                    f"(parameters and optimiser state unchanged; {skipped} skipped so far)")
            else:
                consecutive = 0
            if cfg.throttle:
                time.sleep(cfg.throttle)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                m = {k: float(v) for k, v in m.items()}
                m["skipped_steps"] = skipped
                m["lr"] = float(sched(step - 1))  # the rate used by this step's update
                now = time.perf_counter()
                tok_s = (step - s_last) * tokens_per_step / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                emit({"kind": "train", "step": step, **m, "tokens_per_s": tok_s,
                      "time": now - t_start})
                progress.update(step, m["loss"], tok_s, force=last)
            stop_early = False
            if step % cfg.eval_every == 0 or last:
                ev = evaluate(eval_fn, params, evals)
                emit({"kind": "eval", "step": step, **ev, "time": time.perf_counter() - t_start})
                # early stop (Zoology: held-out accuracy 0.99); the state is checkpointed
                stop_early = bool(cfg.early_stop_accuracy) and ev["eval_accuracy"] >= cfg.early_stop_accuracy
            if step % cfg.ckpt_every == 0 or last or stop_early:
                save(step)
            if stop_early and not last:
                progress.update(step, float(m["loss"]), 0.0, force=True)
                log(f"early stop at step {step}: held-out accuracy {ev['eval_accuracy']:.4f} >= "
                    f"{cfg.early_stop_accuracy} (--early-stop-accuracy)")
                break
        if f is not None:
            f.close()

        final_eval = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
        if final_eval is None:  # resumed at the end: evaluate the restored state
            final_eval = {"step": step, **evaluate(eval_fn, params, evals)}
        summary = {"step": step, "start_step": start, "run_dir": run_dir, "n_params": n_params,
                   "skipped_steps": skipped, "finished": False,
                   "metrics_path": metrics_path, "final_eval": final_eval,
                   "checkpoints": ckpt.steps(), "params": params, "mesh": dict(mesh.shape),
                   "process_count": nproc}
        if cfg.task == "lm":
            log(f"held-out: loss {final_eval['eval_loss']:.4f} nats/byte, perplexity "
                f"{final_eval['eval_ppl']:.3f}, {final_eval['eval_loss'] / math.log(2):.3f} bits/byte")
        elif cfg.task == "vit":
            log(f"test accuracy {final_eval['eval_accuracy']:.4f} on the held-out digits "
                f"(test loss {final_eval['eval_loss']:.4f})")
        else:
            log(f"MQAR test accuracy {final_eval['eval_accuracy']:.4f} "
                f"({cfg.mqar_test_examples} examples x {cfg.mqar_kv} queries)")
        if cfg.plot and lead:
            png = os.path.join(run_dir, "loss.png")
            if plot_metrics(records, png, f"{cfg.preset}: {'/'.join(mixer_names)}"):
                summary["plot"] = png
                log(f"loss curve: {png}")
        log(f"metrics: {metrics_path}; checkpoints: {ckpt.root} steps {ckpt.steps()}")
        if cfg.task == "lm" and cfg.sample_tokens:
            # sample from a host copy of the (possibly sharded) parameters on one device
            host = _host_copy((params, rest, rng))
            if lead:
                hp, hr, hrng = host
                m = nnx.merge(graphdef, hp, hr)
                prompt = jnp.asarray(np.frombuffer(SAMPLE_PROMPT.encode(), np.uint8).astype(np.int32)[None])
                key = jax.random.wrap_key_data(jnp.asarray(hrng))
                out = generate(m, prompt, cfg.sample_tokens, rng=key, temperature=0.8, top_k=40)
                text = bytes(np.asarray(out[0]).astype(np.uint8).tolist()).decode("utf-8", errors="replace")
                summary["sample"] = SAMPLE_PROMPT + text
                log("sample (temperature 0.8, top-k 40):\n" + SAMPLE_PROMPT + text)
                summary["sample_path"] = os.path.join(run_dir, "sample.txt")
                try:  # atomically, beside the checkpoints (python -m train.generate --run reproduces it)
                    tmp = summary["sample_path"] + ".tmp"
                    with open(tmp, "w") as fh:
                        fh.write(summary["sample"] + "\n")
                    os.replace(tmp, summary["sample_path"])
                except OSError as e:
                    raise CheckpointWriteError(
                        f"writing {summary['sample_path']} failed ({describe_write_error(e)}); checkpoints "
                        f"(steps {ckpt.steps()}) are intact") from None
        return summary
    finally:
        ckpt.close()


def _host_copy(tree):
    """Numpy copy of a tree of (possibly multi-process sharded) arrays on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x
