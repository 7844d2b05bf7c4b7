"""``--preset vit``: a ViT³ image classifier on scikit-learn's 8×8 handwritten digits.

The digits (1,797 grey-scale 8×8 images of 10 classes, Alpaydin & Kaynak, UCI; shipped
inside scikit-learn, so nothing is downloaded) are split once, by a fixed permutation
independent of the run seed, into 1,437 training and 360 held-out test images (20%).
Pixels (0..16) are scaled to ``[0, 1]`` and standardised with the training mean and std.

The model is :class:`tttla_jax.nn.ViTClassifier` (patch embedding, ViT³ blocks — GLU and
3×3 depthwise-conv fast weights, docs/rules/vit3.md — mean pooling, linear head). Training goes
through the same loop as the language-model presets (:func:`tttla_jax.train.loop.run`): grain
pipeline with checkpointed iterator state, AdamW + warm-up + cosine + clipping, orbax
checkpoints, ``--resume``, metrics JSONL and a loss plot, device meshes. The loop calls
the hooks here when ``cfg.task == "vit"``: :func:`build_model`, :func:`train_source`,
:func:`eval_batches`, :func:`forward_loss`, :func:`tokens_per_image`.

scikit-learn is an optional dependency (the ``train`` extra); without it the preset
fails with a message saying ``pip install -e '.[train]'``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import grain.python as grain
from flax import nnx

from tttla_jax.nn.vit import ViTClassifier, ViTConfig

IMAGE_SIZE = 8
NUM_CLASSES = 10
TEST_SIZE = 360  # 20% of the 1,797 images
SPLIT_SEED = 20251201  # the train/test split is fixed, whatever the run seed
INSTALL_HINT = "pip install -e '.[train]'"


def sklearn_missing_message() -> str:
    return ("the vit preset trains on scikit-learn's 8x8 digits, but scikit-learn is not "
            f"installed; install the training extra: {INSTALL_HINT}")


def have_sklearn() -> bool:
    """Whether scikit-learn can be imported (checked without importing it)."""
    return importlib.util.find_spec("sklearn") is not None


@functools.lru_cache(maxsize=1)
def digits_split():
    """``(train_x, train_y, test_x, test_y)``: images ``[n, 8, 8, 1]`` float32
    (standardised with the training statistics), labels int32; 1,437 / 360 images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(f"error: {sklearn_missing_message()}") from None
    d = load_digits()
    x = np.asarray(d.images, np.float64) / 16.0
    y = np.asarray(d.target, np.int32)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = perm[:TEST_SIZE], perm[TEST_SIZE:]
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).astype(np.float32)[..., None]
    for a in (x, y):
        a.setflags(write=False)
    return x[train], y[train], x[test], y[test]


class DigitsSource(grain.RandomAccessDataSource):
    """Random access to one split: ``{"images": [8, 8, 1], "labels": (), "mask": ()}``."""

    def __init__(self, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        tx, ty, vx, vy = digits_split()
        self.split = split
        self.x, self.y = (tx, ty) if split == "train" else (vx, vy)
        self.sha = hashlib.sha256(self.x.tobytes() + self.y.tobytes()).hexdigest()[:16]

    def __repr__(self):  # grain checks the source of a restored iterator state by repr
        return f"DigitsSource(split={self.split}, n={len(self.y)}, sha256={self.sha})"

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"images": self.x[i], "labels": self.y[i], "mask": np.bool_(True)}


def train_source(cfg):
    """``(source, sampler)`` of the training pipeline: shuffled, reshuffled every epoch."""
    source = DigitsSource("train")
    sampler = grain.IndexSampler(len(source), shuffle=True, seed=cfg.seed, num_epochs=None,
                                 shard_options=grain.NoSharding())
    return source, sampler


def eval_batches(cfg) -> list:
    """The whole test split as numpy batches of ``batch_size`` (the last one shorter; the
    loop pads it with masked rows)."""
    src = DigitsSource("test")
    n = len(src)
    return [{"images": src.x[s:s + cfg.batch_size], "labels": src.y[s:s + cfg.batch_size],
             "mask": np.ones(min(cfg.batch_size, n - s), bool)}
            for s in range(0, n, cfg.batch_size)]


def model_config(cfg) -> ViTConfig:
    return ViTConfig(image_size=IMAGE_SIZE, patch_size=cfg.patch_size, in_channels=1,
                     num_classes=NUM_CLASSES, width=cfg.width, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, impl="auto", param_dtype=jnp.float32)


def build_model(cfg) -> ViTClassifier:
    """The classifier, initialised inside one jitted function compiled at XLA backend
    optimisation level 0 (it runs once).

    Same PRNG draws as eager construction (values equal up to float rounding of the
    scaling), but eager construction compiles every initialiser of every distinct shape
    separately (~50 small XLA programs: ~15 s CPU, most of a tiny run); this is one
    program, ~3 s CPU.
    """
    mcfg = model_config(cfg)
    make = lambda: ViTClassifier(mcfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.state(make()), compiler_options={"xla_backend_optimization_level": 0})
    return nnx.merge(graphdef, init())


def tokens_per_image(cfg) -> int:
    """Patch tokens per image (the loop's tokens/s counts these)."""
    return (IMAGE_SIZE // cfg.patch_size) ** 2


def forward_loss(model: ViTClassifier, batch: dict):
    """``(sum of NLL, number of images, number correct)`` over the unmasked rows."""
    logits = model(batch["images"]).astype(jnp.float32)
    labels = batch["labels"].astype(jnp.int32)
    m = batch["mask"].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(m), jnp.sum(correct * m)
