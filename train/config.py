"""Training configuration: a frozen dataclass, presets and the command-line parser.

Every field of :class:`TrainConfig` is a command-line flag (``steps`` -> ``--steps``,
``ckpt_dir`` -> ``--ckpt-dir``); ``--preset`` picks the defaults the other flags
override. Unknown flags and bad values exit with an error that lists the choices.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Optional

from tttla_jax.nn.mixers import MIXERS

TASKS = ("lm", "mqar", "vit")
DISTRIBUTED = ("auto", "on", "off")
ON_NONFINITE = ("stop", "skip")

# (seq_len, num_kv_pairs) of the standard MQAR benchmark (Zoology, Arora et al. 2023).
MQAR_SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint).

    Attributes (the command-line help repeats these):
      preset: name of the preset the defaults came from ("lm-tiny", "mqar" or "vit").
      task: "lm" (byte-level language modelling on the embedded corpus, Python's own
        ``pydoc_data`` topics), "mqar" (multi-query associative recall) or "vit" (ViT³
        classifier on scikit-learn's 8x8 digits, see train/vit.py; needs the train extra).
      seed: seed of the parameters, the data order and the sampling key.
      steps: number of optimiser steps.
      batch_size: sequences per step.
      seq_len: tokens per training sequence.
      vocab_size: 256 for bytes; 8192 for MQAR.
      width: model width (embedding and residual stream size).
      num_layers: number of blocks (one token mixer + one MLP each).
      num_heads: attention / fast-weight heads per mixer (head dim = width / num_heads).
      mixers: one token-mixer name per layer (a single name is repeated); from
        ``tttla_jax.nn.MIXERS``. Default: a LaCT-LLM-style hybrid, layer 1 a LaCT layer
        (V0) with its in-layer sliding-window branch (lact_window), layer 2 sliding-window
        attention.
      window: sliding-window size of the "swa" mixer.
      chunk_size: chunk size of the chunked (parallel) forms.
      lr: AdamW peak learning rate (reached after the warm-up).
      min_lr_ratio: final learning rate as a fraction of lr: a cosine decay from lr to
        lr * min_lr_ratio at the last step.
      warmup_steps: steps of linear warm-up from 0 to lr.
      weight_decay: AdamW decoupled weight decay, on parameters with two or more axes
        (matrices and the embedding), not on vectors (norm scales, biases).
      b1: AdamW first-moment (momentum) decay rate.
      b2: AdamW second-moment decay rate.
      grad_clip: global-norm gradient clipping.
      log_every: steps between metric records (the last step is always logged).
      eval_every: steps between held-out evaluations (also at the last step).
      eval_batches: held-out batches per evaluation (LM); MQAR uses mqar_test_examples.
      ckpt_every: steps between checkpoints (also at the last step).
      keep: number of checkpoints kept (the oldest are deleted).
      ckpt_dir: checkpoint/metrics directory ("" means ``runs/<preset>``).
      resume: continue from the newest valid checkpoint in ckpt_dir.
      sample_tokens: bytes generated at the end (LM; 0 to skip).
      mqar_kv: key-value pairs per MQAR sequence (seq_len >= 4 * mqar_kv).
      mqar_power_a: power-law exponent of the query distances.
      mqar_test_examples: size of the fixed MQAR test set.
      mqar_protocol: MQAR generator (train/mqar.py): "ours" (each query key is followed by
        its value, values drawn with replacement) or "zoology" (the Zoology benchmark's
        construction: distinct values, the query region holds only the query keys, each
        followed by 0).
      early_stop_accuracy: stop once a held-out evaluation reaches this accuracy (Zoology
        stops at 0.99); 0 never stops early.
      lact_preset: LaCT ladder step or anomaly of the "lact" mixer ("v0" … "v6",
        "ascent", "q_is_k", "inner_steps"; tttla_jax.nn.lact.LACT_PRESETS).
      lact_window: sliding-window size of the LaCT layer's softmax-attention branch (the
        LaCT-LLM hybrid); 0 for the fast-weight branch alone.
      lact_base_lr: inner learning rate of the LaCT layer at a zero lr projection (and the
        constant lr of the presets without per-token lr, V4+).
      pack_documents: LM task: every pydoc topic is a document; a training row packs the
        pieces of the documents it overlaps (``cu_seqlens``), the model runs each as if alone
        (no state, attention or conv tap crosses a boundary) and the loss skips the first
        byte of every document. false (default: packing measured ~30% more CPU time on the
        default job): plain windows across document boundaries.
      progress: show the progress bar on stderr.
      plot: write loss.png (needs matplotlib).
      throttle: seconds to sleep after every step (only to test kill/resume; at most 60).
      on_nonfinite: what a step whose loss or gradient norm is not finite does: "stop"
        (the run ends with an error naming the step, exit status 3; no checkpoint is
        written) or "skip" (the step leaves parameters and optimiser state unchanged, the
        count is the "skipped_steps" metric; 10 non-finite steps in a row still stop).
      tune_malloc: keep freed host memory in the process (glibc mallopt; see
        tttla_jax.host.tune_malloc): XLA:CPU otherwise page-faults its large temporaries
        back in on every step.
      patch_size: side of the square patches of the vit task (8x8 images; must divide 8).
      mesh: device mesh "data=D,fsdp=F" (either may be omitted: 1); "" puts every device
        on the data axis. Parameters and optimiser state are sharded over fsdp by their
        logical axis names, batches over data x fsdp (see train/distributed.py). A third
        axis "seq=S" (e.g. "data=2,seq=4") splits every sequence over S devices (sequence
        parallelism, docs/context_parallel.md; tasks lm, also with packed documents, and mqar).
      distributed: "auto" calls jax.distributed.initialize when a coordinator, process
        count or process id is given (flags or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
        JAX_PROCESS_ID); "on" always (cluster auto-detection on TPU pods, SLURM, ...);
        "off" never.
      coordinator: "host:port" of process 0 for jax.distributed.initialize.
      init_timeout: seconds a multi-process start waits for its peers before it fails
        with an error naming the coordinator.
      num_processes: number of processes (0: from the environment).
      process_id: index of this process (-1: from the environment).
    """

    preset: str = "lm-tiny"
    task: str = "lm"
    seed: int = 0
    steps: int = 250
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: int = 256
    width: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mixers: tuple = ("lact", "swa")
    window: int = 64
    chunk_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 100
    keep: int = 3
    ckpt_dir: str = ""
    resume: bool = False
    sample_tokens: int = 200
    mqar_kv: int = 4
    mqar_power_a: float = 0.01
    mqar_test_examples: int = 256
    mqar_protocol: str = "ours"
    early_stop_accuracy: float = 0.0
    lact_preset: str = "v0"
    lact_window: int = 64
    lact_base_lr: float = 1e-3
    pack_documents: bool = False
    progress: bool = True
    plot: bool = True
    throttle: float = 0.0
    on_nonfinite: str = "stop"
    tune_malloc: bool = True
    mesh: str = ""
    distributed: str = "auto"
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    init_timeout: int = 120
    patch_size: int = 2

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {self.preset!r}, expected one of {tuple(PRESETS)}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        for name in ("steps", "batch_size", "seq_len", "vocab_size", "width", "num_layers",
                     "num_heads", "window", "chunk_size", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep", "mqar_kv", "mqar_test_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("warmup_steps", "sample_tokens", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {v!r}")
        for f in dataclasses.fields(self):  # inf / nan are never a meaningful setting
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name}: expected a finite number, got {v!r}")
        if self.throttle > 60:
            raise ValueError(f"throttle: expected at most 60 seconds, got {self.throttle!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite: expected one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
        if isinstance(self.init_timeout, bool) or not isinstance(self.init_timeout, int) \
                or not 1 <= self.init_timeout <= 86400:
            raise ValueError(f"init_timeout: expected an integer number of seconds in [1, 86400], "
                             f"got {self.init_timeout!r}")
        for name in ("lr", "grad_clip", "mqar_power_a"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive float, got {getattr(self, name)!r}")
        from tttla_jax.train.mqar import PROTOCOLS
        if self.mqar_protocol not in PROTOCOLS:
            raise ValueError(f"mqar_protocol: expected one of {PROTOCOLS}, got {self.mqar_protocol!r}")
        if not 0 <= self.early_stop_accuracy <= 1:
            raise ValueError(f"early_stop_accuracy: expected a float in [0, 1] (0: never), "
                             f"got {self.early_stop_accuracy!r}")
        for name in ("weight_decay", "throttle"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a float >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a float in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a float in [0, 1), got {getattr(self, name)!r}")
        from tttla_jax.nn.lact import LACT_PRESETS
        if self.lact_preset not in LACT_PRESETS:
            raise ValueError(f"lact_preset: expected one of {LACT_PRESETS}, got {self.lact_preset!r}")
        if isinstance(self.lact_window, bool) or not isinstance(self.lact_window, int) or self.lact_window < 0:
            raise ValueError(f"lact_window: expected an integer >= 0, got {self.lact_window!r}")
        if not self.lact_base_lr > 0:
            raise ValueError(f"lact_base_lr: expected a positive float, got {self.lact_base_lr!r}")
        from tttla_jax.train.distributed import parse_mesh  # validates the mesh string
        if parse_mesh(self.mesh).get("seq", 1) > 1:  # sequence parallelism: LM / MQAR rows
            if self.task == "vit":
                raise ValueError(f"mesh: a seq axis ({self.mesh!r}) splits token sequences; the vit "
                                 f"task has none (use data / fsdp)")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed: expected one of {DISTRIBUTED}, got {self.distributed!r}")
        if isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) \
                or self.num_processes < 0:
            raise ValueError(f"num_processes: expected an integer >= 0, got {self.num_processes!r}")
        if isinstance(self.process_id, bool) or not isinstance(self.process_id, int) \
                or self.process_id < -1:
            raise ValueError(f"process_id: expected an integer >= -1, got {self.process_id!r}")
        mixers = (self.mixers,) if isinstance(self.mixers, str) else tuple(self.mixers)
        for m in mixers:
            if m not in MIXERS:
                raise ValueError(f"mixers: unknown mixer {m!r}, expected names from {tuple(MIXERS)}")
        if len(mixers) == 1:
            mixers = mixers * self.num_layers
        elif len(mixers) != self.num_layers and self.task != "vit":  # vit: every layer is ViT3
            raise ValueError(f"mixers: expected 1 or num_layers={self.num_layers} names, got {len(mixers)}: "
                             f"{mixers}")
        object.__setattr__(self, "mixers", mixers)
        if self.width % self.num_heads:
            raise ValueError(f"width: expected a multiple of num_heads={self.num_heads}, got {self.width}")
        if self.task == "lm" and self.vocab_size < 256:
            raise ValueError(f"vocab_size: byte-level LM needs vocab_size >= 256, got {self.vocab_size}")
        if self.task == "mqar":
            if self.vocab_size < 4 * self.mqar_kv or self.vocab_size % 2:
                raise ValueError(f"vocab_size: MQAR needs an even vocab_size >= 4 * mqar_kv, got "
                                 f"{self.vocab_size}")
            if self.seq_len < 4 * self.mqar_kv:
                raise ValueError(f"seq_len: MQAR needs seq_len >= 4 * mqar_kv = {4 * self.mqar_kv}, "
                                 f"got {self.seq_len}")
            if self.mqar_protocol == "zoology" and self.seq_len % 2:
                raise ValueError(f"seq_len: the zoology MQAR protocol needs an even seq_len, got "
                                 f"{self.seq_len}")
        if self.task == "vit":  # checks of train/vit.py's task, before anything is built
            if isinstance(self.patch_size, bool) or not isinstance(self.patch_size, int) \
                    or self.patch_size <= 0 or 8 % self.patch_size:
                raise ValueError(f"patch_size: expected 1, 2, 4 or 8 (a divisor of the 8x8 digits), "
                                 f"got {self.patch_size!r}")
            from tttla_jax.train.vit import have_sklearn, sklearn_missing_message
            if not have_sklearn():
                raise ValueError(f"task: {sklearn_missing_message()}")

    @property
    def run_dir(self) -> str:
        """Checkpoint and metrics directory."""
        return self.ckpt_dir or f"runs/{self.preset}"


# Fields a resumed run must share with its checkpoint (they define the model, the data
# order or the optimiser trajectory). The others (steps, logging, ...) may change.
STRUCTURAL = ("task", "seed", "batch_size", "seq_len", "vocab_size", "width", "num_layers",
              "num_heads", "mixers", "window", "chunk_size", "lr", "min_lr_ratio", "warmup_steps",
              "weight_decay", "b1", "b2", "grad_clip", "mqar_kv", "mqar_power_a", "mqar_protocol",
              "lact_preset", "lact_window", "lact_base_lr", "patch_size", "pack_documents")

PRESETS = {
    # Byte-level LM on pydoc_data, LaCT (V0) + SWA hybrid, 0.124M parameters, 250 steps:
    # held-out 2.55 bits/byte (ppl 5.84) in 2 min 45 s on the 2-core machine shared at load
    # average ~4 (300 steps: 2.41 bits/byte, 3 min 22 s). The previous DeltaNet/SWA default
    # (width 96, 400 steps): 73 s, 1.99 bits/byte.
    "lm-tiny": {},
    # MQAR at the smallest benchmark setting (seq_len 64, 4 key-value pairs, vocab 8192):
    # ~80% test accuracy after 600 steps (3 min on 2 loaded CPU cores).
    "mqar": dict(task="mqar", vocab_size=8192, seq_len=64, mqar_kv=4, width=64, num_layers=2,
                 num_heads=2, mixers=("delta_net",), batch_size=32, steps=600, lr=1e-2,
                 warmup_steps=50, weight_decay=0.0, eval_every=200, ckpt_every=200,
                 sample_tokens=0),
    # ViT³ classifier on scikit-learn's 8x8 digits (train/vit.py): 2x2 patches (4x4 grid),
    # 0.130M parameters. Measured: test accuracy 0.978 (352/360) at step 600 (0.969 at 200);
    # 10 min wall on 2 CPU cores under load 14-16 (165 s CPU time in total).
    "vit": dict(task="vit", patch_size=2, width=64, num_layers=2, num_heads=2, batch_size=64,
                steps=600, lr=3e-3, warmup_steps=50, weight_decay=0.05, eval_every=200,
                ckpt_every=200, sample_tokens=0),
}


def make_config(preset: str = "lm-tiny", **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` applied (validated)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}, expected one of {tuple(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown config fields {bad}, expected a subset of {sorted(fields)}")
    kw = dict(PRESETS[preset])
    kw.update(overrides)
    return TrainConfig(preset=preset, **kw)


def _doc_for(name: str) -> str:
    doc = TrainConfig.__doc__
    lines = doc.splitlines()
    out, grab = [], False
    for line in lines:
        s = line.strip()
        head = s.split(":", 1)[0]
        if ":" in s and (head == name or name in [h.strip() for h in head.split(",")]):
            out, grab = [s.split(":", 1)[1].strip()], True
            continue
        if grab:
            if not s or (":" in s and line.startswith("      ") and not line.startswith("        ")):
                break
            out.append(s)
    return " ".join(out)


def _bool(s: str) -> bool:
    t = s.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected one of true/false/yes/no/1/0, got {s!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if "unrecognized arguments" in message:
            flags = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
            message += "; valid flags: " + " ".join(flags)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = _Parser(
        prog="python -m train",
        description=("Train a small tttla_jax LanguageModel (default: a LaCT + sliding-window "
                     "attention hybrid, as LaCT-LLM) with AdamW, warm-up + cosine, gradient "
                     "clipping, grain data, orbax checkpoints (resumable bitwise), JSONL metrics and "
                     "a loss plot."),
        epilog="Defaults in [brackets] are those of --preset lm-tiny; --preset mqar changes: " + ", ".join(
            f"{k}={v}" for k, v in PRESETS["mqar"].items()) + "; --preset vit changes: " + ", ".join(
            f"{k}={v}" for k, v in PRESETS["vit"].items()),
        allow_abbrev=False)
    p.add_argument("--preset", choices=tuple(PRESETS), default="lm-tiny",
                   help="defaults to start from (lm-tiny: byte LM on pydoc_data; mqar: "
                        f"associative recall, settings (seq_len, kv) in {MQAR_SETTINGS}; vit: ViT3 "
                        "classifier on scikit-learn's 8x8 digits, needs pip install -e '.[train]')")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = (_doc_for(f.name) or f.name) + f" [{getattr(defaults, f.name)!r}]"
        help_ = help_.replace("``", "").replace("%", "%%")  # plain text in the terminal
        typ = typing.get_type_hints(TrainConfig)[f.name]
        if f.name == "resume":
            p.add_argument(flag, action="store_true", default=None, help=help_)
        elif typ is bool:
            p.add_argument(flag, type=_bool, default=None, metavar="{true,false}", help=help_)
        elif f.name == "mixers":
            p.add_argument(flag, nargs="+", choices=tuple(MIXERS), default=None, help=help_)
        elif f.name == "task":
            p.add_argument(flag, choices=TASKS, default=None, help=help_)
        elif f.name == "lact_preset":
            from tttla_jax.nn.lact import LACT_PRESETS
            p.add_argument(flag, choices=LACT_PRESETS, default=None, help=help_)
        elif f.name == "distributed":
            p.add_argument(flag, choices=DISTRIBUTED, default=None, help=help_)
        elif f.name == "mqar_protocol":
            from tttla_jax.train.mqar import PROTOCOLS
            p.add_argument(flag, choices=PROTOCOLS, default=None, help=help_)
        elif f.name == "on_nonfinite":
            p.add_argument(flag, choices=ON_NONFINITE, default=None, help=help_)
        else:
            p.add_argument(flag, type=typ, default=None, help=help_)
    return p


def parse_args(argv: Optional[list] = None) -> TrainConfig:
    """Parse the command line into a validated :class:`TrainConfig` (exits on errors)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k != "preset"}
    if "mixers" in overrides:
        overrides["mixers"] = tuple(overrides["mixers"])
    try:
        return make_config(ns.preset, **overrides)
    except ValueError as e:
        parser.error(str(e))
