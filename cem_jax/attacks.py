"""Model inversion attacks on a trained client: decoder, WGAN-GP and white-box attacks, baseline.

Threat model (DESIGN §2 step 4, reference §6-7): the attacker queries the trained client as a black
box and sees exactly what the server sees — every obfuscation applied, fresh noise on every query. The
client is a pure traceable function ``encode(key, images) -> features`` (``images`` uint8
``[B, H, W, 3]`` or float in ``[0, 1]``); it is called inside the jitted steps with a fresh key per
step. The attacker learns an inverse ``decoder(features) -> images`` on pairs it builds itself.

* :func:`decoder_attack` — the reference's decoder attack (§6): MSE on ``[0, 1]`` images, Adam with
  PyTorch's coupled L2 weight decay, batch 256; trained to convergence (a step budget, a held-out
  validation split, a plateau rule with learning-rate decays, the best-validation weights kept; see
  :class:`DecoderAttackConfig`) instead of the reference's fixed 50-epoch cosine schedule.
* :func:`gan_attack` — the reference's GAN attack (§7): WGAN-GP with the ``DGWGAN32`` critic and the
  generator started from the trained decoder, generator loss ``−E D(G(z)) + 1500·MSE``; same fit loop.
* :func:`whitebox_attack` — model inversion by optimisation with the client's weights (rMLE): no
  training data, the noise model's likelihood plus a total-variation prior.
* :func:`mean_image_baseline` — the trivial attacker (the mean training image for every image): an
  attack that does not beat it clearly has learned nothing and is no privacy evidence.
* :func:`split_settings` — the two data settings (train-time, inference-time).

Every step is one ``jax.jit`` over the (decoder, optimizer[, critic]) state, split once with
``nnx.split``, donated, and merged back at the end. Keys, learning rates and data are arguments of
the jitted functions, so that, on a :class:`SplitEncode` client, the decoder attack of the second data
setting reuses what the first compiled (kept in ``encode.compiled``). With a mesh, batches are sharded on its ``data``
axis and the state is replicated. The modules passed in are never modified: the attacks work on copies
and return the trained copy. Every trained attack reports ``steps``, ``converged`` and its validation
curve (:meth:`AttackResult.summary`).

>>> import numpy as np, jax
>>> train, test = np.zeros((50, 4)), np.zeros((20, 4))
>>> {k: (len(a), len(b)) for k, (a, b) in split_settings(train, test).items()}
{'train_time': (50, 20), 'inference_time': (18, 2)}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from cem_jax import metrics as metrics_lib
from cem_jax import parallel, storage
from cem_jax.checkpoint import Checkpointer, CheckpointError, fault_point
from cem_jax.models.decoder import decoder_from_name
from cem_jax.models.layers import Conv, torch_bias_init, torch_kernel_init

Encode = Callable[[jax.Array, jax.Array], jax.Array]


class SplitEncode:
    """An :data:`Encode` in two parts: ``encode(key, x) == obfuscate(key, features(x))``.

    ``features(images) -> z`` is the client itself (deterministic: eval mode, no randomness) and
    ``obfuscate(key, z)`` what is added on the way out (noise, dropout, top-k). Given one, the
    decoder attack computes its training images' features once and draws only the obfuscation in
    each step, with the same key as ``encode`` would: the same function of the same randomness,
    without a client forward pass per step (about a third of the quick preset's attack step).

    >>> enc = SplitEncode(lambda x: 2.0 * x, lambda key, z: z + 1.0)
    >>> float(enc(jax.random.key(0), jnp.ones(())))
    3.0
    """

    def __init__(
        self,
        features: Callable[[jax.Array], jax.Array],
        obfuscate: Callable[[jax.Array, jax.Array], jax.Array],
    ) -> None:
        self.features = features
        self.obfuscate = obfuscate
        # The attacks' jitted functions on this client, kept so that every attack on it reuses
        # them: the decoder attack of the second data setting compiles nothing (keys, learning
        # rates and data are arguments, the modules' structure is part of the key). Freed with
        # the encode.
        self.compiled: dict[tuple, Any] = {}

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        return self.obfuscate(key, self.features(images))


def _reuse(encode: Encode, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, kept on a :class:`SplitEncode` under ``key`` (hashable: a name, the graphdef,
    the mesh, static shapes) and returned again to every later attack on the same client; for any
    other encode, built anew on each call."""
    cache = encode.compiled if isinstance(encode, SplitEncode) else None
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


Progress = Callable[[dict], None]

__all__ = [
    "AttackResult",
    "DecoderAttackConfig",
    "GanAttackConfig",
    "Resume",
    "WGANCritic",
    "WhiteboxAttackConfig",
    "decoder_attack",
    "evaluate_decoder",
    "gan_attack",
    "mean_image_baseline",
    "split_settings",
    "split_validation",
    "total_variation",
    "whitebox_attack",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_fields(
    cfg: Any,
    *,
    ints: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
    nonnegative: tuple[str, ...] = (),
) -> None:
    """Raises ``ValueError`` naming the first field of ``cfg`` outside its accepted range."""
    for name in ints:
        v = getattr(cfg, name)
        _require(isinstance(v, int) and v >= 1, f"{name}={v!r}: accepted an integer >= 1.")
    for name in positive:
        v = getattr(cfg, name)
        _require(v > 0, f"{name}={v}: accepted > 0.")
    for name in nonnegative:
        v = getattr(cfg, name)
        _require(v >= 0, f"{name}={v}: accepted >= 0.")


@dataclasses.dataclass(frozen=True)
class DecoderAttackConfig:
    """The decoder attack (reference §6.3), trained to convergence on a held-out validation split.

    The budget is in optimizer steps. Every ``eval_every`` steps the decoder's MSE on the held-out
    ``val_fraction`` of the attacker's images is measured (eval mode, fixed noise keys); the weights
    with the lowest validation MSE are kept. **Plateau rule**: an evaluation *improves* when the
    validation MSE falls below ``(1 − min_improvement)`` times the last improving one; after ``patience`` evaluations without improvement
    the learning rate is multiplied by ``lr_decay`` (at most ``lr_decays`` times), and after one
    more such plateau at the last rate training stops and the attack counts as **converged**. An
    attack stopped by ``max_steps`` before that is reported with ``converged = False``.
    """

    max_steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    decoder: str = "res_normN8C64"
    eval_batch_size: int = 256
    num_examples: int = 16
    val_fraction: float = 0.1
    eval_every: int = 100
    patience: int = 3
    min_improvement: float = 0.005
    lr_decay: float = 0.2
    lr_decays: int = 2

    def __post_init__(self):
        _check_fields(
            self,
            ints=("max_steps", "batch_size", "eval_batch_size", "eval_every", "patience"),
            positive=("lr",),
            nonnegative=("num_examples", "weight_decay", "min_improvement", "lr_decays"),
        )
        _check_plateau(self)


@dataclasses.dataclass(frozen=True)
class GanAttackConfig:
    """The WGAN-GP attack (reference §7), budget in critic steps, same plateau rule as the decoder.

    One generator step follows every ``n_critic`` critic steps; ``max_steps`` must allow at least
    one (a "GAN" result without a generator step is the decoder's). The validation metric is the
    generator's MSE on the held-out split; the best generator is kept.
    """

    max_steps: int = 30_000
    batch_size: int = 128
    critic_lr: float = 5e-3
    generator_lr: float = 5e-4
    n_critic: int = 10
    mse_weight: float = 1500.0
    gp_weight: float = 10.0
    b1: float = 0.5
    b2: float = 0.999
    critic_width: int = 64
    eval_batch_size: int = 256
    num_examples: int = 16
    val_fraction: float = 0.1
    eval_every: int = 200
    patience: int = 3
    min_improvement: float = 0.005
    lr_decay: float = 0.2
    lr_decays: int = 1

    def __post_init__(self):
        _check_fields(
            self,
            ints=(
                "max_steps",
                "batch_size",
                "n_critic",
                "critic_width",
                "eval_batch_size",
                "eval_every",
                "patience",
            ),
            positive=("critic_lr", "generator_lr"),
            nonnegative=("num_examples", "mse_weight", "gp_weight", "min_improvement", "lr_decays"),
        )
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _require(0 <= v < 1, f"{name}={v}: accepted 0 <= {name} < 1.")
        _require(
            self.max_steps >= self.n_critic,
            f"max_steps={self.max_steps}: the GAN attack needs at least one generator step, i.e. "
            f"max_steps >= n_critic ({self.n_critic}).",
        )
        _check_plateau(self)


@dataclasses.dataclass(frozen=True)
class WhiteboxAttackConfig:
    """The white-box optimisation attack (rMLE / model inversion by optimisation).

    The attacker knows the client's weights. For each observed feature ``z`` it minimises over
    ``x̂ = sigmoid(u) ∈ [0, 1]``::

        Σ_j m_j (f(x̂)_j − z_j)² / (2·max(σ, sigma_floor)²)  +  tv_weight · TV(x̂)

    (the Gaussian noise model's negative log-likelihood, ``m_j = 0`` where the server received an
    exact zero — a dropped or top-k-removed feature — plus an anisotropic total-variation prior),
    with Adam from a grey image. No training data is used. **Convergence**: the objective is
    recorded every ``eval_every`` steps; converged when its relative decrease over the last
    ``eval_every`` steps is below ``tolerance`` (checked at every record, the run stops there).
    """

    max_steps: int = 3000
    lr: float = 0.2
    tv_weight: float = 2.0
    sigma_floor: float = 0.02
    batch_size: int = 128
    num_images: int = 512
    eval_every: int = 50
    tolerance: float = 1e-3
    num_examples: int = 16

    def __post_init__(self):
        _check_fields(
            self,
            ints=("max_steps", "batch_size", "num_images", "eval_every"),
            positive=("lr", "sigma_floor", "tolerance"),
            nonnegative=("tv_weight", "num_examples"),
        )


def _check_plateau(cfg: Any) -> None:
    _require(
        0 < cfg.val_fraction < 1,
        f"val_fraction={cfg.val_fraction}: accepted a fraction in (0, 1) of the attacker's images.",
    )
    _require(0 < cfg.lr_decay < 1, f"lr_decay={cfg.lr_decay}: accepted a factor in (0, 1).")
    _require(
        isinstance(cfg.lr_decays, int), f"lr_decays={cfg.lr_decays!r}: accepted an integer >= 0."
    )


@dataclasses.dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
      metrics: per-image means over the evaluation set: ``"mse"``, ``"psnr"`` (dB), ``"ssim"``
        (NaN unless the targets are images ``[N, H, W, C]`` with ``H, W >= 11``), and the reference's
        batch conventions ``"ref_psnr"`` (PSNR of each batch's MSE) and ``"ref_ssim"``
        (pytorch_ssim, zero padding), batch-size weighted.
      wall_time_s: training + evaluation time.
      decoder: the trained decoder (generator for the GAN attack; ``None`` for the white-box
        attack), a new module holding the best-validation weights.
      examples: ``[n, ...]`` reconstructions of the first ``n`` evaluation images (float32).
      history: the validation curve, one dict per evaluation (``"step"``, ``"train_loss"``,
        ``"val_mse"``, ``"lr"``, ...).
      steps: optimizer steps taken (critic steps for the GAN).
      converged: whether training stopped on the plateau rule (not on ``max_steps``).
      best_step: the step whose weights are returned.
      extra: attack-specific counts (e.g. ``"generator_steps"``, ``"num_train"``, ``"num_val"``).
    """

    metrics: dict[str, float]
    wall_time_s: float
    decoder: nnx.Module | None
    examples: np.ndarray
    history: list[dict] = dataclasses.field(default_factory=list)
    steps: int = 0
    converged: bool = False
    best_step: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able record: metrics, steps, converged flag, the curve, wall time."""
        return {
            **self.metrics,
            "steps": self.steps,
            "best_step": self.best_step,
            "converged": self.converged,
            "curve": self.history,
            "wall_time_s": self.wall_time_s,
            **self.extra,
        }


def split_settings(
    train_images: np.ndarray, test_images: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two attack settings of reference §6.1 as ``name -> (attacker's train set, eval set)``.

    ``"train_time"``: trained on the client's training set, evaluated on the test set.
    ``"inference_time"``: trained on the first 90 % of the test set, evaluated on the last 10 %.
    """
    n = len(test_images)
    cut = n * 9 // 10
    _require(
        0 < cut < n,
        f"test_images: {n} images cannot be split 90/10 into two non-empty parts; accepted >= 2.",
    )
    return {
        "train_time": (train_images, test_images),
        "inference_time": (test_images[:cut], test_images[cut:]),
    }


# --------------------------------------------------------------------------------------------------
# Helpers


def _to_target(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; any float input is the target as it is."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _clone(module: nnx.Module) -> nnx.Module:
    """A deep copy with fresh buffers (the attack's steps donate their state)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state))


def _check_data(name: str, images: Any, *, min_len: int, what: str) -> None:
    _require(
        isinstance(images, np.ndarray | jax.Array) and images.ndim >= 2,
        f"{name}: expected an array [N, ...] (uint8 images [N, H, W, 3] or floats), got "
        f"{type(images).__name__} with shape {np.shape(images)}.",
    )
    _require(
        images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating),
        f"{name}: dtype {images.dtype}; accepted uint8 or floating.",
    )
    _require(len(images) >= min_len, f"{name}: {len(images)} samples; {what}.")


def _check_pair(train: Any, eval_: Any, batch_size: int) -> None:
    _check_data(
        "train_images",
        train,
        min_len=batch_size,
        what=f"accepted at least batch_size={batch_size}",
    )
    _check_data("eval_images", eval_, min_len=1, what="accepted at least 1")
    _require(
        train.shape[1:] == eval_.shape[1:] and train.dtype == eval_.dtype,
        f"eval_images: shape {eval_.shape[1:]} / dtype {eval_.dtype} per sample must match "
        f"train_images {train.shape[1:]} / {train.dtype}.",
    )


def _check_encode(
    encode: Encode, sample: np.ndarray, feature_shape: tuple[int, ...] | None, key: jax.Array
):
    """Traces ``encode`` abstractly; returns its per-sample feature shape (checked if given)."""
    spec = jax.ShapeDtypeStruct((2, *sample.shape[1:]), sample.dtype)
    try:
        out = jax.eval_shape(encode, key, spec)
    except Exception as e:  # noqa: BLE001 — re-raised with context
        raise ValueError(
            f"encode(key, images) failed on images of shape {spec.shape} {spec.dtype}: {e}"
        ) from e
    got = tuple(out.shape[1:])
    _require(
        out.shape[:1] == (2,),
        f"encode: returned shape {out.shape} for a batch of 2; the batch axis must be kept.",
    )
    if feature_shape is not None:
        _require(
            tuple(feature_shape) == got,
            f"feature_shape={tuple(feature_shape)} does not match encode's output {got} for "
            f"images of shape {sample.shape[1:]}.",
        )
    return got


def _check_decoder_output(graphdef, state, feature_shape, target_shape) -> None:
    def apply(state, z):
        return nnx.merge(graphdef, state)(z)

    z = jax.ShapeDtypeStruct((2, *feature_shape), jnp.float32)
    try:
        out = jax.eval_shape(apply, state, z)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"decoder: failed on features of shape {(2, *feature_shape)}: {e}") from e
    _require(
        tuple(out.shape[1:]) == tuple(target_shape),
        f"decoder: outputs {tuple(out.shape[1:])} per sample, the targets are {tuple(target_shape)}.",
    )


class _Placement:
    """Puts batches and state on the mesh (or leaves them on the default device)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def check(self, name: str, batch_size: int) -> None:
        if self.mesh is not None:
            n = self.mesh.shape[parallel.DATA_AXIS]
            _require(
                batch_size % n == 0,
                f"{name}={batch_size}: must be a multiple of the mesh's data axis size ({n}).",
            )

    def batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return parallel.shard_batch(x, self.mesh)

    def state(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        return parallel.replicate(tree, self.mesh)

    def jit(self, fn: Callable, **kwargs) -> Callable:
        if self.mesh is not None:
            kwargs["out_shardings"] = parallel.replicated(self.mesh)
        return jax.jit(fn, **kwargs)

    def context(self):
        if self.mesh is None:
            return _NullContext()
        return jax.set_mesh(self.mesh)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _epoch_batches(key: jax.Array, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """``[steps, batch_size]`` indices of one shuffled epoch (the short last batch dropped)."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


# --------------------------------------------------------------------------------------------------
# Evaluation


def _per_sample_metrics(rec: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-sample ``mse``, ``psnr``, ``ssim`` and the reference's zero-padded SSIM, each ``[B]``."""
    b = target.shape[0]
    image_like = target.ndim == 4 and min(target.shape[1:3]) >= metrics_lib.SSIM_FILTER_SIZE
    if target.ndim == 4:
        flat_r, flat_t = rec, target
    else:
        flat_r, flat_t = rec.reshape(b, 1, 1, -1), target.reshape(b, 1, 1, -1)
    out = {"mse": metrics_lib.mse(flat_r, flat_t), "psnr": metrics_lib.psnr(flat_r, flat_t)}
    if image_like:
        out["ssim"] = metrics_lib.ssim(rec, target)
        out["ref_ssim"] = jax.vmap(
            lambda r, t: metrics_lib.reference_mse_psnr_ssim(r[None], t[None])["ssim"]
        )(rec, target)
    else:
        out["ssim"] = jnp.full((b,), jnp.nan)
        out["ref_ssim"] = jnp.full((b,), jnp.nan)
    return out


def _evaluate(
    encode: Encode,
    graphdef,
    state,
    images: np.ndarray,
    *,
    key: jax.Array,
    batch_size: int,
    placement: _Placement,
    num_examples: int,
) -> tuple[dict[str, float], np.ndarray]:
    """Eval-mode metrics of the decoder ``(graphdef, state)`` over ``images`` in padded batches."""
    placement.check("eval_batch_size", batch_size)

    n_examples = min(num_examples, batch_size)

    def build():
        def step(state, batch, key, i):
            decoder = nnx.merge(graphdef, state)
            decoder.eval()
            feats = encode(jax.random.fold_in(key, i), batch)
            rec = decoder(feats)
            return rec[:n_examples], _per_sample_metrics(rec, _to_target(batch))

        # outputs replicated: the per-sample metrics ([B] each) and the first reconstructions can
        # be read on every process, also when the batch's rows live on other hosts
        return placement.jit(step)

    step = _reuse(encode, ("evaluate", graphdef, placement.mesh, n_examples), build)
    n = len(images)
    outs = []
    with placement.context():
        for i, start in enumerate(range(0, n, batch_size)):
            batch = images[start : start + batch_size]
            valid = len(batch)
            if valid < batch_size:  # pad to the static shape; padded rows are masked out below
                pad = np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            have = len(outs) * n_examples  # only the first batch(es) contribute examples
            rec, per = step(state, placement.batch(batch), key, jnp.int32(i))
            outs.append((valid, rec if have < num_examples else None, per))
    return _reduce_metrics(jax.device_get(outs), num_examples, images.shape[1:])


def _reduce_metrics(
    batches: list[tuple[int, Any, dict[str, Any]]], num_examples: int, sample_shape: tuple
) -> tuple[dict[str, float], np.ndarray]:
    """Means over images of per-sample metrics, the reference's batch PSNR, the first examples.

    ``batches``: host ``(valid rows, reconstructions or None, {metric: [B]})`` per padded batch.
    """
    sums: dict[str, float] = {}
    ref_psnr_sum, n = 0.0, 0
    examples: list[np.ndarray] = []
    for valid, rec, per in batches:
        per = {k: np.asarray(v, np.float64)[:valid] for k, v in per.items()}
        for k, v in per.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        batch_mse = float(per["mse"].mean())
        ref_psnr_sum += valid * float(-10.0 * np.log10(max(batch_mse, 1e-10)))
        n += valid
        have = sum(len(e) for e in examples)
        if have < num_examples and rec is not None:
            examples.append(np.asarray(rec[: min(valid, num_examples - have)], np.float32))
    out = {k: v / n for k, v in sums.items()}
    out["ref_psnr"] = ref_psnr_sum / n
    ex = np.concatenate(examples) if examples else np.zeros((0, *sample_shape), np.float32)
    return out, ex


def _finish(
    encode: Encode,
    decoder: nnx.Module,
    eval_images: np.ndarray,
    *,
    key: jax.Array,
    config: Any,
    placement: _Placement,
    t0: float,
    fit: _Fit,
    extra: dict[str, Any],
) -> AttackResult:
    """Evaluates a trained decoder/generator (eval mode) and packs the :class:`AttackResult`."""
    graphdef, state = nnx.split(decoder)
    metrics, examples = _evaluate(
        encode,
        graphdef,
        state,
        eval_images,
        key=key,
        batch_size=config.eval_batch_size,
        placement=placement,
        num_examples=config.num_examples,
    )
    if fit.resumed_at is not None:
        extra = {**extra, "resumed_at_step": fit.resumed_at}
    return AttackResult(
        metrics=metrics,
        wall_time_s=fit.earlier_s + time.perf_counter() - t0,
        decoder=decoder,
        examples=examples,
        history=fit.history,
        steps=fit.steps,
        converged=fit.converged,
        best_step=fit.best_step,
        extra=extra,
    )


def evaluate_decoder(
    encode: Encode,
    decoder: nnx.Module,
    images: np.ndarray,
    *,
    key: jax.Array,
    batch_size: int,
    mesh: Mesh | None = None,
    num_examples: int = 16,
) -> dict[str, Any]:
    """Reconstruction metrics of ``decoder(encode(key_b, x))`` against ``x`` (decoder in eval mode).

    Args:
      encode: the client as the attacker queries it, ``(key, images[B, ...]) -> features``.
      decoder: an NNX module ``features -> reconstructions`` (not modified).
      images: ``[N, H, W, 3]`` uint8 (targets ``x / 255``) or floats ``[N, ...]`` (targets as is).
      key: noise key; batch ``b`` uses ``fold_in(key, b)``.
      batch_size: evaluation batch; the short last batch is padded and masked.
      mesh: optional device mesh (batches sharded on ``data``).
      num_examples: how many reconstructions of the first images to return.
    Returns:
      ``{"mse", "psnr", "ssim", "ref_psnr", "ref_ssim"}`` floats (see :class:`AttackResult`) and
      ``"examples"``: ``[num_examples, ...]`` float32.
    """
    _check_data("images", images, min_len=1, what="accepted at least 1")
    _require(batch_size >= 1, f"batch_size={batch_size}: accepted >= 1.")
    placement = _Placement(mesh)
    graphdef, state = nnx.split(decoder)
    state = placement.state(state)
    out, ex = _evaluate(
        encode,
        graphdef,
        state,
        images,
        key=key,
        batch_size=batch_size,
        placement=placement,
        num_examples=num_examples,
    )
    return {**out, "examples": ex}


# --------------------------------------------------------------------------------------------------
# The fit loop shared by the trained attacks: step budget, validation, plateau rule, best weights


def split_validation(
    images: np.ndarray, fraction: float, *, batch_size: int, key: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``(train, val)`` split of the attacker's images; ``val`` holds ``ceil(f·N)`` images.

    Raises ``ValueError`` when the validation part would be empty or the training part smaller than
    one batch.
    """
    n = len(images)
    n_val = math.ceil(fraction * n)
    _require(
        0 < fraction < 1 and 1 <= n_val < n,
        f"val_fraction={fraction}: cannot hold out a validation split of {n} attacker images; "
        "accepted a fraction in (0, 1) that leaves images on both sides.",
    )
    _require(
        n - n_val >= batch_size,
        f"attacker set: {n} images minus a validation split of {n_val} (val_fraction={fraction}) "
        f"leaves {n - n_val}, fewer than one batch ({batch_size}); accepted at least "
        f"{batch_size + n_val} images, a smaller batch or a smaller val_fraction.",
    )
    perm = np.asarray(jax.random.permutation(key, n))
    return images[np.sort(perm[n_val:])], images[np.sort(perm[:n_val])]


def _batches(key: jax.Array, n: int, batch_size: int, start: int = 0):
    """Endless shuffled batches of indices (reshuffled every pass, short last batch dropped).

    ``start`` skips that many batches: the batches a resumed attack sees are the ones the
    uninterrupted attack would have seen from that step on.
    """
    per_epoch = n // batch_size
    epoch, offset = divmod(start, per_epoch)
    while True:
        yield from _epoch_batches(key, epoch, n, batch_size)[offset:]
        epoch, offset = epoch + 1, 0


@dataclasses.dataclass
class _Fit:
    state: Any
    history: list[dict]
    steps: int
    converged: bool
    best_step: int
    earlier_s: float = 0.0  # wall time of the attack before it was resumed
    resumed_at: int | None = None  # the step it was resumed from


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a trained attack keeps its progress, so that a killed run resumes it.

    The fit loop saves everything it holds (weights and optimizer state, the best weights so far,
    the plateau counters, the validation curve) as one orbax checkpoint in ``directory`` (the newest
    one kept) after a validation: after the first one, after the last one, and in between once at
    least ``every_s`` seconds have passed since the last save (default: 40 times as long as that
    save took, so saving costs at most ~2.5 % of the attack's time; a save of the default decoder
    takes ~1.2 s on a 2-core CPU, so every validation or every other one there).

    A later attack with the same ``identity`` (the caller's JSON description of what it attacks,
    e.g. the run's config) and the same attack (its config, key, data and feature shape) restores
    it and goes on from that step: the result is the same as the uninterrupted attack's, and a
    finished attack is not trained again. A checkpoint of anything else is discarded, with a note
    on ``stream`` (default stderr).

    Args:
      directory: a local folder or ``gs://`` path of this attack's own (it is deleted and rewritten
        when it holds another attack's checkpoint).
      identity: JSON-able; must match for a checkpoint to be resumed.
      every_s: the least wall time between two saves (0: after every validation; ``None``: the
        2.5 % rule above).
      stream: where the notes go.
    """

    directory: str
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    every_s: float | None = None
    stream: TextIO | None = None


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def tree_digest(tree: Any) -> str:
    """A short digest of every array of ``tree`` (its values, shapes and dtypes)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(parallel.to_host(leaf) if isinstance(leaf, jax.Array) else leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _attack_identity(
    resume: Resume, name: str, config: Any, key: jax.Array, images: np.ndarray, **extra: Any
) -> dict[str, Any]:
    """What a checkpoint of attack ``name`` must match to be resumed (JSON)."""
    return _as_json(
        {
            "attack": name,
            "caller": resume.identity,
            "config": dataclasses.asdict(config),
            "key": np.asarray(
                jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            ).tolist(),
            "images": [list(images.shape), str(images.dtype), _digest(images)],
            **extra,
        }
    )


class _FitStore:
    """The checkpoint of one attack's fit loop (see :class:`Resume`)."""

    def __init__(self, resume: Resume, identity: dict[str, Any]):
        self.resume = resume
        self.identity = identity
        self.out = resume.stream if resume.stream is not None else sys.stderr
        self.ckpt = Checkpointer(resume.directory, max_to_keep=1, stream=self.out)
        self.last_save: float | None = None  # when the last save ended (None: none yet)
        self.save_s = 0.0  # how long it took

    def _note(self, text: str) -> None:
        print(f"note: {text}", file=self.out, flush=True)

    def _discard(self, why: str) -> None:
        self._note(f"{self.resume.directory}: {why}; the attack starts afresh")
        self.ckpt.close()
        if parallel.is_main_process():
            storage.remove_tree(self.ckpt.directory)
        parallel.barrier("cem_jax:attack_checkpoint_discarded")
        self.ckpt = Checkpointer(self.resume.directory, max_to_keep=1, stream=self.out)

    def load(self, state: Any) -> tuple[Any, Any, dict[str, Any]] | None:
        """``(state, best_state, meta)`` of the newest checkpoint of this attack, or ``None``."""
        if not self.ckpt.all_steps():
            return None
        try:
            meta = self.ckpt.read_meta()
        except (CheckpointError, FileNotFoundError) as e:
            self._discard(f"its checkpoint does not read ({e})")
            return None
        if meta.get("identity") != self.identity:
            self._discard("the checkpoint there is of another attack or another client")
            return None
        try:
            tree, meta = self.ckpt.restore({"state": state, "best": state})
        except (CheckpointError, FileNotFoundError) as e:
            self._discard(f"its checkpoint does not restore ({e})")
            return None
        return tree["state"], tree["best"], meta

    def due(self) -> bool:
        every = self.resume.every_s if self.resume.every_s is not None else 40.0 * self.save_s
        due = self.last_save is None or time.perf_counter() - self.last_save >= every
        if jax.process_count() > 1:  # every process saves, or none: process 0's clock decides
            due = bool(parallel.broadcast_from_main(int(due)))
        return due

    def save(self, step: int, state: Any, best_state: Any, meta: dict[str, Any]) -> None:
        t = time.perf_counter()
        self.ckpt.save(
            step, {"state": state, "best": best_state}, {**meta, "identity": self.identity}
        )
        self.last_save = time.perf_counter()
        self.save_s = self.last_save - t
        fault_point("attack_checkpoint", step)

    def close(self) -> None:
        self.ckpt.close()


def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _fit(
    name: str,
    config: Any,
    step_fn: Callable[[Any, jax.Array, int, float], tuple[Any, jax.Array]],
    state: Any,
    train_images: np.ndarray,
    val_mse: Callable[[Any], float],
    *,
    key: jax.Array,
    placement: _Placement,
    progress: Progress | None,
    store: _FitStore | None = None,
) -> _Fit:
    """Runs ``step_fn`` for at most ``config.max_steps`` steps under the plateau rule.

    ``step_fn(state, batch, step, lr_scale) -> (state, loss)``, ``batch`` the rows of
    ``train_images`` (or, when it is a tuple of arrays, a tuple of their rows); the learning rates are the config's
    times ``lr_scale`` (1, then ``lr_decay`` per plateau). Losses stay on the device and are fetched
    once per evaluation. Returns the best-validation state (a copy) and the validation curve.
    With a ``store`` (:class:`Resume`), it starts from the store's checkpoint of this attack if
    there is one, and saves one after validations; the store is closed on return.
    """
    with contextlib.closing(store) if store is not None else contextlib.nullcontext():
        t_start = time.perf_counter()
        best, best_state, best_step, reference = math.inf, None, 0, math.inf
        bad, decays, scale, converged = 0, 0, 1.0, False
        history: list[dict] = []
        step, earlier_s, resumed_at = 0, 0.0, None
        restored = store.load(state) if store is not None else None
        if restored is not None:
            state, best_state, meta = restored
            step = resumed_at = int(meta["step"])
            best, best_step = float(meta["best"]), int(meta["best_step"])
            reference = math.inf if meta["reference"] is None else float(meta["reference"])
            bad, decays, scale = int(meta["bad"]), int(meta["decays"]), float(meta["scale"])
            converged, history = bool(meta["converged"]), list(meta["history"])
            earlier_s = float(meta["elapsed_s"])
            done = converged or step >= config.max_steps
            store._note(
                f"{name} attack resumed from its checkpoint at step {step}/{config.max_steps}"
                + (" (finished there)" if done else "")
            )
            if done:
                return _Fit(best_state, history, step, converged, best_step, earlier_s, resumed_at)
    losses: list[jax.Array] = []
    arrays = train_images if isinstance(train_images, tuple) else (train_images,)
    batches = _batches(key, len(arrays[0]), config.batch_size, start=step)
    t_last = time.perf_counter()
    while step < config.max_steps:
        idx = next(batches)
        batch = tuple(placement.batch(a[idx]) for a in arrays)
        state, loss = step_fn(state, batch if len(batch) > 1 else batch[0], step, scale)
        losses.append(loss)
        step += 1
        if step % config.eval_every and step < config.max_steps:
            continue
        v = val_mse(state)
        now = time.perf_counter()
        rec = {
            "attack": name,
            "step": step,
            "max_steps": config.max_steps,
            "loss": float(jnp.mean(jnp.stack(losses))),
            "val_mse": v,
            "lr_scale": scale,
            "steps_per_s": len(losses) / max(now - t_last, 1e-9),
        }
        losses, t_last = [], now
        if not math.isfinite(v):
            raise FloatingPointError(
                f"{name} attack: validation MSE is {v} at step {step}; the attack diverged "
                "(lower its learning rate)."
            )
        if v < best:  # the weights kept are always the lowest validation MSE seen
            best, best_step = v, step
            best_state = _copy_tree(state)
        if v < reference * (1.0 - config.min_improvement):  # a real improvement
            reference, bad = v, 0
        else:
            bad += 1
            if bad >= config.patience:
                if decays < config.lr_decays:
                    decays, bad, scale = decays + 1, 0, scale * config.lr_decay
                else:
                    converged = True
        rec["converged"] = converged
        history.append(rec)
        if store is not None and (converged or step >= config.max_steps or store.due()):
            meta = {
                "step": step,
                "best": best,
                "best_step": best_step,
                "reference": reference if math.isfinite(reference) else None,
                "bad": bad,
                "decays": decays,
                "scale": scale,
                "converged": converged,
                "history": history,
                "elapsed_s": earlier_s + time.perf_counter() - t_start,
            }
            store.save(step, state, best_state, meta)
        if progress is not None:
            progress(dict(rec))
        if converged:
            break
    return _Fit(best_state, history, step, converged, best_step, earlier_s, resumed_at)


def _val_mse_fn(
    encode: Encode,
    graphdef: Any,
    images: np.ndarray,
    *,
    key: jax.Array,
    config: Any,
    placement: _Placement,
) -> Callable[[Any], float]:
    """``state -> mean per-image MSE`` over ``images`` of ``m(encode(key_b, x))``, ``m`` the first
    module of ``nnx.merge(graphdef, state)`` in eval mode.

    Fixed noise keys (batch ``b`` uses ``fold_in(key, b)``), so successive evaluations differ only
    through the state. One host sync per call.
    """
    # always ``eval_batch_size`` rows (a short set padded and masked), not fewer for a small set:
    # one shape, so the next attack on the same client (the other data setting) compiles nothing
    batch_size = config.eval_batch_size
    if placement.mesh is not None:
        n_dev = placement.mesh.shape[parallel.DATA_AXIS]
        batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    n = len(images)
    chunks = []
    for b, start in enumerate(range(0, n, batch_size)):
        x = images[start : start + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[: len(x)] = 1.0
        if len(x) < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - len(x), *x.shape[1:]), x.dtype)])
        chunks.append((placement.batch(x), placement.batch(mask), b))

    def build():
        apply = _eval_apply(graphdef, 0)

        @jax.jit
        def sse(state, x, mask, key, b):
            rec = apply(state, encode(jax.random.fold_in(key, b), x))
            err = jnp.mean((rec - _to_target(x)) ** 2, axis=tuple(range(1, x.ndim)))
            return jnp.sum(err * mask)

        return sse

    sse = _reuse(encode, ("validation", graphdef), build)

    def val(state) -> float:
        with placement.context():
            total = sum(sse(state, x, m, key, jnp.int32(b)) for x, m, b in chunks)
        return float(total) / n

    return val


# --------------------------------------------------------------------------------------------------
# The trivial baseline


class _MeanImage(nnx.Module):
    def __init__(self, image: np.ndarray):
        self.image = nnx.Variable(jnp.asarray(image, jnp.float32))

    def __call__(self, z: jax.Array) -> jax.Array:
        return jnp.broadcast_to(self.image[...], (z.shape[0], *self.image.shape))


def mean_image_baseline(
    train_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    batch_size: int = 256,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Metrics of the trivial attacker that predicts the mean training image for every image.

    An attack that does not beat it has learned nothing about the features. Same metrics and
    conventions as :class:`AttackResult` (``"mse"``, ``"psnr"``, ``"ssim"``, ``"ref_psnr"``,
    ``"ref_ssim"``).

    >>> x = np.stack([np.zeros((2, 2, 3)), np.ones((2, 2, 3))]).astype(np.float32)
    >>> round(mean_image_baseline(x, x)["mse"], 6)     # predicts 0.5 everywhere
    0.25
    """
    _check_data("train_images", train_images, min_len=1, what="accepted at least 1")
    _check_data("eval_images", eval_images, min_len=1, what="accepted at least 1")
    target = train_images.astype(np.float64)
    if train_images.dtype == np.uint8:
        target = target / 255.0
    mean = target.mean(axis=0)
    model = _MeanImage(mean)
    graphdef, state = nnx.split(model)
    placement = _Placement(mesh)
    if mesh is not None:
        n_dev = mesh.shape[parallel.DATA_AXIS]
        batch_size = max(n_dev, batch_size // n_dev * n_dev)
    out, _ = _evaluate(
        lambda key, x: jnp.zeros((x.shape[0], 1), jnp.float32),
        graphdef,
        placement.state(state),
        eval_images,
        key=jax.random.key(0),
        batch_size=batch_size,
        placement=placement,
        num_examples=0,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Decoder attack


def _decoder_train_step(
    graphdef, encode: Encode, key: jax.Array, placement: _Placement, base_lr: float
):
    """The jitted step ``(state, batch, step, lr_scale) -> (state, loss)`` of the decoder attack.

    ``state`` is ``nnx.state((decoder, optimizer))`` (donated); the features are
    ``encode(fold_in(key, step), batch)``, or, when ``batch`` is a pair ``(clean features, images)``
    (``encode`` a :class:`SplitEncode`), ``encode.obfuscate(fold_in(key, step), clean)``; loss ``mean((decoder(z) - target)²)``, train mode; the
    learning rate is ``base_lr · lr_scale`` (an injected hyper-parameter: no recompilation). The
    jitted function (``step.jitted``, arguments ``(state, batch, key, step, base_lr, lr_scale)``)
    is kept on a :class:`SplitEncode` for every later attack on the same client with the same
    ``graphdef``.
    """

    def build():
        def train_step(state, batch, key, step, base_lr, scale):
            decoder, optimizer = nnx.merge(graphdef, state)
            step_key = jax.random.fold_in(key, step)
            if isinstance(batch, tuple):  # (clean features, images): SplitEncode's precomputed path
                clean, batch = batch
                feats = encode.obfuscate(step_key, clean)
            else:
                feats = encode(step_key, batch)
            feats = jax.lax.stop_gradient(feats)
            target = _to_target(batch)

            def loss_fn(d):
                return jnp.mean((d(feats) - target) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(decoder)
            optimizer.opt_state.hyperparams["learning_rate"][...] = base_lr * scale
            optimizer.update(decoder, grads)
            return nnx.state((decoder, optimizer)), loss

        return placement.jit(train_step, donate_argnums=0)

    jitted = _reuse(encode, ("decoder_train_step", graphdef, placement.mesh), build)
    lr = jnp.float32(base_lr)

    def step_fn(state, batch, step, scale):
        return jitted(state, batch, key, jnp.int32(step), lr, jnp.float32(scale))

    step_fn.jitted = jitted  # (state, batch, key, step, base_lr, scale): for cost analysis
    return step_fn


def _clean_features(
    encode: SplitEncode, images: np.ndarray, batch_size: int, placement: _Placement
) -> np.ndarray:
    """``encode.features`` of every image, in batches of ``batch_size`` (the last one padded), on
    the host: ``[N, *feature_shape]`` float32."""
    fn = _reuse(encode, ("features", placement.mesh), lambda: placement.jit(encode.features))
    out = []
    with placement.context():
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(fn(placement.batch(chunk)))[: batch_size - pad])
    return np.concatenate(out)


def _eval_apply(graphdef, index: int | None = None):
    """``(state, z) -> module(z)`` in eval mode for the module at ``index`` of a merged tuple."""

    def apply(state, z):
        merged = nnx.merge(graphdef, state)
        module = merged if index is None else merged[index]
        module.eval()
        return module(z)

    return apply


def decoder_attack(
    encode: Encode,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    config: DecoderAttackConfig,
    key: jax.Array,
    feature_shape: tuple[int, ...] | None,
    mesh: Mesh | None = None,
    decoder: nnx.Module | None = None,
    progress: Progress | None = None,
    resume: Resume | None = None,
) -> AttackResult:
    """Trains an inversion decoder on ``(encode(x), x)`` pairs to convergence and evaluates it.

    The attacker's images are split into a training part and a held-out validation part
    (``config.val_fraction``, :func:`split_validation`). Loss ``mean((decoder(encode(key_t, x)) −
    x01)²)`` with the decoder in train mode; Adam with coupled L2 weight decay (as PyTorch's Adam);
    batches reshuffled every pass. Training stops on the plateau rule of
    :class:`DecoderAttackConfig` or at ``max_steps``; the best-validation decoder is evaluated in
    eval mode on ``eval_images`` (fresh noise per batch).

    Args:
      encode: the client as the attacker queries it, ``(key, images[B, ...]) -> features[B, ...]``.
      train_images: the attacker's images, ``[N, H, W, 3]`` uint8 (targets ``x / 255``) or
        floats ``[N, ...]`` (targets as they are; any shape with a custom ``decoder``).
      eval_images: evaluation images, same per-sample shape and dtype.
      config: hyper-parameters and the step budget.
      key: all randomness (split, decoder init, shuffling, encode noise, evaluation noise).
      feature_shape: per-sample shape of ``encode``'s output, e.g. ``(8, 8, 8)``; checked against
        ``encode`` (``None``: taken from it).
      mesh: optional device mesh; batches are sharded on its ``data`` axis.
      decoder: a custom decoder module (not modified; a trained copy is returned); default: build
        ``config.decoder`` for ``feature_shape`` and the image size.
      progress: called after every validation with ``{"attack", "step", "max_steps", "loss",
        "val_mse", "lr_scale", "steps_per_s", "converged"}``.
      resume: where to checkpoint the training so that a killed attack resumes (:class:`Resume`);
        ``None``: nothing is saved.
    Returns:
      :class:`AttackResult` (``history`` is the validation curve).
    """
    t0 = time.perf_counter()
    _check_pair(train_images, eval_images, config.batch_size)
    placement = _Placement(mesh)
    placement.check("batch_size", config.batch_size)
    feature_shape = _check_encode(encode, train_images[:2], feature_shape, key)
    k_init, k_shuffle, k_train, k_eval, k_split, k_val = jax.random.split(key, 6)
    fit_x, val_x = split_validation(
        train_images, config.val_fraction, batch_size=config.batch_size, key=k_split
    )
    target_shape = train_images.shape[1:]
    decoder_given = decoder
    if decoder is None:
        _require(
            train_images.ndim == 4 and target_shape[0] == target_shape[1] and target_shape[2] == 3,
            f"train_images: shape {train_images.shape}; the built-in decoder needs square RGB "
            "images [N, H, H, 3] (pass decoder= for other data).",
        )
        _require(
            len(feature_shape) == 3 and feature_shape[0] == feature_shape[1],
            f"feature_shape={feature_shape}: the built-in decoder needs square features (s, s, c).",
        )
        decoder = decoder_from_name(
            config.decoder,
            in_channels=feature_shape[2],
            feature_size=feature_shape[0],
            image_size=target_shape[0],
            rngs=nnx.Rngs(k_init),
        )
    else:
        decoder = _clone(decoder)
    decoder.train()

    def make_tx(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay), optax.adam(learning_rate)
        )

    # the optimizer's graphdef holds ``tx``: one per (weight decay, rate) and client, so that the
    # attack of the next data setting finds its steps compiled
    tx = _reuse(
        encode,
        ("decoder_tx", config.weight_decay, config.lr),
        lambda: optax.inject_hyperparams(make_tx)(learning_rate=config.lr),
    )
    optimizer = nnx.Optimizer(decoder, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((decoder, optimizer))
    dec_graphdef, dec_state = nnx.split(decoder)
    _check_decoder_output(dec_graphdef, dec_state, feature_shape, target_shape)
    state = placement.state(state)

    step_fn = _decoder_train_step(graphdef, encode, k_train, placement, config.lr)
    fit_data = fit_x
    # the client once, not in every step (one process: every process would need its own rows)
    if isinstance(encode, SplitEncode) and jax.process_count() == 1:
        fit_data = (_clean_features(encode, fit_x, config.batch_size, placement), fit_x)
    val_mse = _val_mse_fn(encode, graphdef, val_x, key=k_val, config=config, placement=placement)
    store = None
    if resume is not None:
        custom = None if decoder_given is None else type(decoder_given).__name__
        store = _FitStore(
            resume,
            _attack_identity(
                resume, "decoder", config, key, train_images, features=feature_shape, decoder=custom
            ),
        )
    fit = _fit(
        "decoder",
        config,
        step_fn,
        state,
        fit_data,
        val_mse,
        key=k_shuffle,
        placement=placement,
        progress=progress,
        store=store,
    )
    decoder, _ = nnx.merge(graphdef, fit.state)
    return _finish(
        encode,
        decoder,
        eval_images,
        key=k_eval,
        config=config,
        placement=placement,
        t0=t0,
        fit=fit,
        extra={"num_train": len(fit_x), "num_val": len(val_x)},
    )


# --------------------------------------------------------------------------------------------------
# GAN attack


class WGANCritic(nnx.Module):
    """``DGWGAN32`` of GMI (reference §7), generalised to any image side. ``[B, H, W, c] -> [B]``.

    ``conv5x5/2 (c -> w)``, LeakyReLU 0.2; 2 x [``conv5x5/2``, InstanceNorm (affine), LeakyReLU 0.2]
    (``w -> 2w -> 4w``); then a ``valid`` conv whose kernel covers the remaining ``ceil(H/8)``
    side (4 for 32 px, 6 for 48, 8 for 64) down to one scalar. As in GMI, the first layer has no
    normalisation. PyTorch default initialisation.
    """

    def __init__(self, image_size: int, *, in_channels: int = 3, width: int = 64, rngs: nnx.Rngs):
        _require(image_size >= 1, f"image_size={image_size}: accepted >= 1.")

        def conv(cin, cout, k, stride, pad):
            return Conv(
                cin,
                cout,
                (k, k),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=torch_kernel_init(),
                bias_init=torch_bias_init(cin * k * k),
                rngs=rngs,
            )

        side = image_size
        for _ in range(3):
            side = (side + 1) // 2
        self.conv1 = conv(in_channels, width, 5, 2, 2)
        self.conv2 = conv(width, 2 * width, 5, 2, 2)
        self.norm2 = nnx.InstanceNorm(2 * width, epsilon=1e-5, rngs=rngs)
        self.conv3 = conv(2 * width, 4 * width, 5, 2, 2)
        self.norm3 = nnx.InstanceNorm(4 * width, epsilon=1e-5, rngs=rngs)
        self.head = conv(4 * width, 1, side, 1, 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.conv1(x), 0.2)
        h = jax.nn.leaky_relu(self.norm2(self.conv2(h)), 0.2)
        h = jax.nn.leaky_relu(self.norm3(self.conv3(h)), 0.2)
        return self.head(h).reshape(x.shape[0])


def _gradient_penalty(critic: WGANCritic, real: jax.Array, fake: jax.Array, key: jax.Array):
    """``mean_i (||∇_x D(x̃_i)||₂ − 1)²`` at ``x̃ = real + α(fake − real)``, ``α ~ U[0, 1)`` per image."""
    alpha = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1))
    interp = real + alpha * (fake - real)
    g = jax.grad(lambda t: jnp.sum(critic(t)))(interp)
    norm = jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) + 1e-12)
    return jnp.mean((norm - 1.0) ** 2)


def gan_attack(
    encode: Encode,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    config: GanAttackConfig,
    key: jax.Array,
    init_decoder: nnx.Module,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
    resume: Resume | None = None,
) -> AttackResult:
    """WGAN-GP refinement of a trained inversion decoder (reference §7), to convergence.

    The generator ``G`` is a copy of ``init_decoder`` (train mode); the critic ``D`` is
    :class:`WGANCritic`. Every step trains ``D`` on one batch with
    ``−(E D(x01) − E D(G(z))) + gp_weight·GP``; every ``n_critic``-th step then trains ``G`` on the
    same batch (same noisy features) with ``−E D(G(z)) + mse_weight·MSE(G(z), x01)``. Adam
    ``(b1, b2)`` at ``critic_lr`` / ``generator_lr`` (times the plateau rule's scale). The
    generator's MSE on a held-out split decides the plateau and which generator is kept; it is
    evaluated in eval mode like the decoder attack.

    Args:
      encode: the client as the attacker queries it.
      train_images: ``[N, H, W, 3]`` uint8 (or float in [0, 1]) images.
      eval_images: evaluation images, same per-sample shape and dtype.
      config: hyper-parameters and the critic-step budget.
      key: all randomness.
      init_decoder: the trained decoder (not modified).
      mesh: optional device mesh.
      progress: called after every validation (as :func:`decoder_attack`), with
        ``"generator_steps"``.
      resume: where to checkpoint the training so that a killed attack resumes (:class:`Resume`;
        the checkpoint also names the weights of ``init_decoder``).
    Returns:
      :class:`AttackResult` with the best generator as ``decoder``; ``extra["generator_steps"]``.
    """
    t0 = time.perf_counter()
    _check_pair(train_images, eval_images, config.batch_size)
    _require(
        train_images.ndim == 4,
        f"train_images: shape {train_images.shape}; the GAN attack needs images [N, H, W, C].",
    )
    placement = _Placement(mesh)
    placement.check("batch_size", config.batch_size)
    feature_shape = _check_encode(encode, train_images[:2], None, key)
    k_init, k_shuffle, k_train, k_eval, k_split, k_val = jax.random.split(key, 6)
    fit_x, val_x = split_validation(
        train_images, config.val_fraction, batch_size=config.batch_size, key=k_split
    )
    target_shape = train_images.shape[1:]

    generator = _clone(init_decoder)
    generator.train()
    g_graphdef, g_state = nnx.split(generator)
    _check_decoder_output(g_graphdef, g_state, feature_shape, target_shape)
    critic = WGANCritic(
        target_shape[0],
        in_channels=target_shape[2],
        width=config.critic_width,
        rngs=nnx.Rngs(k_init),
    )

    def adam():
        return optax.inject_hyperparams(optax.adam)(learning_rate=0.0, b1=config.b1, b2=config.b2)

    opt_g = nnx.Optimizer(generator, adam(), wrt=nnx.Param)
    opt_d = nnx.Optimizer(critic, adam(), wrt=nnx.Param)
    graphdef, state = nnx.split((generator, critic, opt_g, opt_d))
    state = placement.state(state)

    def critic_step(state, batch, step, scale):
        g, d, opt_g, opt_d = nnx.merge(graphdef, state)
        k_enc, k_gp = jax.random.split(jax.random.fold_in(k_train, step))
        feats = jax.lax.stop_gradient(encode(k_enc, batch))
        real = _to_target(batch)
        fake = jax.lax.stop_gradient(g(feats))  # train mode: BN statistics update, as in PyTorch

        def loss_fn(d):
            wdist = jnp.mean(d(real)) - jnp.mean(d(fake))
            return -wdist + config.gp_weight * _gradient_penalty(d, real, fake, k_gp), wdist

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(d)
        opt_d.opt_state.hyperparams["learning_rate"][...] = config.critic_lr * scale
        opt_d.update(d, grads)
        return nnx.state((g, d, opt_g, opt_d)), loss

    def generator_step(state, batch, step, scale):
        g, d, opt_g, opt_d = nnx.merge(graphdef, state)
        k_enc, _ = jax.random.split(jax.random.fold_in(k_train, step))
        feats = jax.lax.stop_gradient(encode(k_enc, batch))
        real = _to_target(batch)

        def loss_fn(g):
            fake = g(feats)
            return -jnp.mean(d(fake)) + config.mse_weight * jnp.mean((fake - real) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(g)
        opt_g.opt_state.hyperparams["learning_rate"][...] = config.generator_lr * scale
        opt_g.update(g, grads)
        return nnx.state((g, d, opt_g, opt_d)), loss

    critic_step = placement.jit(critic_step, donate_argnums=0)
    generator_step = placement.jit(generator_step, donate_argnums=0)

    def step_fn(state, batch, step, scale):
        s, sc = jnp.int32(step), jnp.float32(scale)
        state, loss = critic_step(state, batch, s, sc)
        if (step + 1) % config.n_critic == 0:
            state, _ = generator_step(state, batch, s, sc)
        return state, loss

    val_mse = _val_mse_fn(encode, graphdef, val_x, key=k_val, config=config, placement=placement)

    # eval_every >= n_critic and max_steps >= n_critic: every validation follows a generator step.
    cfg_for_fit = dataclasses.replace(config, eval_every=max(config.eval_every, config.n_critic))
    store = None
    if resume is not None:
        store = _FitStore(
            resume,
            _attack_identity(
                resume, "gan", config, key, train_images, init_decoder=tree_digest(g_state)
            ),
        )
    fit = _fit(
        "gan",
        cfg_for_fit,
        step_fn,
        state,
        fit_x,
        val_mse,
        key=k_shuffle,
        placement=placement,
        progress=progress,
        store=store,
    )
    generator_steps = fit.steps // config.n_critic  # one after every n_critic-th critic step
    _require(
        fit.state is not None and generator_steps > 0,
        f"GAN attack: no generator step in {fit.steps} critic steps (n_critic={config.n_critic});"
        " accepted max_steps >= n_critic.",
    )
    generator, _, _, _ = nnx.merge(graphdef, fit.state)
    return _finish(
        encode,
        generator,
        eval_images,
        key=k_eval,
        config=config,
        placement=placement,
        t0=t0,
        fit=fit,
        extra={
            "generator_steps": generator_steps,
            "num_train": len(fit_x),
            "num_val": len(val_x),
        },
    )


# --------------------------------------------------------------------------------------------------
# White-box optimisation attack


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation per image: ``Σ|x[i+1,j]−x[i,j]| + Σ|x[i,j+1]−x[i,j]|``. ``[B]``.

    >>> float(total_variation(jnp.array([[[[0.0], [1.0]], [[0.0], [1.0]]]]))[0])   # 2x2, 1 channel
    2.0
    """
    dh = jnp.abs(x[:, 1:] - x[:, :-1]).sum(axis=(1, 2, 3))
    dw = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).sum(axis=(1, 2, 3))
    return dh + dw


def whitebox_attack(
    features: Callable[[jax.Array], jax.Array],
    encode: Encode,
    eval_images: np.ndarray,
    *,
    config: WhiteboxAttackConfig,
    key: jax.Array,
    sigma: float,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> AttackResult:
    """Model inversion by optimisation with the client's weights (rMLE), no training data.

    For each evaluation image the attacker observes ``z = encode(key, x)`` (what the server
    receives) and minimises the objective of :class:`WhiteboxAttackConfig` over ``x̂ ∈ [0, 1]``
    with ``features`` (the client's clean, differentiable map). The first ``config.num_images``
    evaluation images are attacked, ``config.batch_size`` at a time.

    Args:
      features: ``images [B, H, W, 3] float in [0, 1] -> clean features [B, ...]`` (differentiable).
      encode: ``(key, images) -> transmitted features`` (every obfuscation, fresh noise).
      eval_images: ``[N, H, W, 3]`` uint8 or float in [0, 1].
      config: hyper-parameters and the step budget.
      key: observation noise.
      sigma: the noise standard deviation of the channel (0: none; ``config.sigma_floor`` is used).
      mesh: optional device mesh (images sharded on ``data``).
      progress: called at every record with ``{"attack": "whitebox", "step", "max_steps",
        "loss", "batch", "converged"}``.
    Returns:
      :class:`AttackResult` (``decoder`` is ``None``; ``history``: the objective curve of each batch).
    """
    t0 = time.perf_counter()
    _check_data("eval_images", eval_images, min_len=1, what="accepted at least 1")
    _require(
        eval_images.ndim == 4,
        f"eval_images: shape {eval_images.shape}; the white-box attack needs images [N, H, W, C].",
    )
    _require(sigma >= 0, f"sigma={sigma}: accepted >= 0.")
    placement = _Placement(mesh)
    images = eval_images[: config.num_images]
    bs = min(config.batch_size, len(images))
    if mesh is not None:
        n_dev = mesh.shape[parallel.DATA_AXIS]
        bs = max(n_dev, -(-bs // n_dev) * n_dev)
    scale = 1.0 / (2.0 * max(float(sigma), config.sigma_floor) ** 2)
    tx = optax.adam(config.lr)

    def objective(u, z_obs, mask):
        x = jax.nn.sigmoid(u)
        f = features(x).reshape(z_obs.shape)
        nll = jnp.sum(mask * (f - z_obs) ** 2, axis=tuple(range(1, z_obs.ndim))) * scale
        return nll + config.tv_weight * total_variation(x)  # [B]

    def chunk(u, opt_state, z_obs, mask, valid):
        def body(_, carry):
            u, opt_state = carry
            grad = jax.grad(lambda u: jnp.sum(objective(u, z_obs, mask) * valid))(u)
            updates, opt_state = tx.update(grad, opt_state, u)
            return optax.apply_updates(u, updates), opt_state

        u, opt_state = jax.lax.fori_loop(0, config.eval_every, body, (u, opt_state))
        per = objective(u, z_obs, mask)
        return u, opt_state, jnp.sum(per * valid) / jnp.sum(valid)

    chunk = jax.jit(chunk, donate_argnums=(0, 1))
    observe = jax.jit(lambda k, x: encode(k, x))
    # replicated outputs: readable on every process, also when the rows live on other hosts
    per_sample = placement.jit(
        lambda u, x: (_per_sample_metrics(jax.nn.sigmoid(u), _to_target(x)), jax.nn.sigmoid(u))
    )

    batches: list[tuple[int, Any, dict[str, Any]]] = []
    history: list[dict] = []
    steps_max, all_converged = 0, True
    with placement.context():
        for b, start in enumerate(range(0, len(images), bs)):
            x = images[start : start + bs]
            valid_n = len(x)
            if valid_n < bs:
                x = np.concatenate([x, np.zeros((bs - valid_n, *x.shape[1:]), x.dtype)])
            valid = np.zeros(bs, np.float32)
            valid[:valid_n] = 1.0
            xb = placement.batch(x)
            z_obs = observe(jax.random.fold_in(key, b), xb)
            mask = (z_obs != 0).astype(jnp.float32)
            u = jnp.zeros(x.shape, jnp.float32)  # sigmoid(0) = 0.5: a grey image
            if mesh is not None:
                u = placement.batch(np.zeros(x.shape, np.float32))
            opt_state = tx.init(u)
            vb = placement.batch(valid)
            prev, step, converged = math.inf, 0, False
            while step < config.max_steps:
                u, opt_state, obj = chunk(u, opt_state, z_obs, mask, vb)
                step += config.eval_every
                obj = float(obj)
                if not math.isfinite(obj):
                    raise FloatingPointError(f"whitebox attack: objective {obj} at step {step}.")
                converged = math.isfinite(prev) and prev - obj <= config.tolerance * abs(prev)
                rec = {
                    "attack": "whitebox",
                    "batch": b,
                    "step": step,
                    "max_steps": config.max_steps,
                    "loss": obj,
                    "converged": converged,
                }
                history.append(rec)
                if progress is not None:
                    progress(dict(rec))
                prev = obj
                if converged:
                    break
            steps_max = max(steps_max, step)
            all_converged &= converged
            per, rec_all = per_sample(u, xb)
            batches.append((valid_n, *jax.device_get((rec_all, per))))
    n = len(images)
    metrics, ex = _reduce_metrics(batches, config.num_examples, images.shape[1:])
    return AttackResult(
        metrics=metrics,
        wall_time_s=time.perf_counter() - t0,
        decoder=None,
        examples=ex,
        history=history,
        steps=steps_max,
        converged=all_converged,
        best_step=steps_max,
        extra={"num_images": n},
    )
