"""Defended split training with CEM (DESIGN §2 steps 1-3, §5).

One :class:`Trainer` owns the split model's graph definitions, the optimizer and three jitted functions
over the device mesh: the train step (augment → client → defense → server → cross-entropy + defense
losses + ``λ·L_C``), the evaluation step (clean and defended accuracy), and the clean feature pass that
refreshes the CEM mixture after every epoch. The model and optimizer state are split once into a
:class:`TrainState` pytree, donated to every step, and merged back only to build a client for the
attacks. :func:`train` is the epoch loop with checkpoints (resume loses at most the current epoch),
NaN detection and per-epoch metrics.

Randomness is explicit: every key is folded from ``jax.random.key(cfg.seed)`` with a purpose tag and the
step or epoch, so a resumed run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from cem_jax import data as data_lib
from cem_jax import defenses, entropy, kmeans, parallel
from cem_jax import metrics as metrics_lib
from cem_jax.attacks import SplitEncode
from cem_jax.checkpoint import Checkpointer, fault_point
from cem_jax.config import RunConfig, fingerprint_diff
from cem_jax.models import build_split_model, feature_shape

FORMAT_VERSION = 1

# Purpose tags folded into the run key (never change: resuming depends on them).
_TAG_INIT, _TAG_TRAIN, _TAG_ORDER, _TAG_EVAL, _TAG_KMEANS, _TAG_ADV = 1, 2, 3, 4, 5, 6

# The adversarial defense's local decoder (reference §3.3: res_normN4C64, Adam 1e-3, MultiStepLR with
# milestones [60, 150, 240, 260] and gamma 0.2 over 240 epochs; the last two are never reached, so
# they are kept as fractions 0.25 and 0.625 of the run).
ADVERSARY_DECODER = "res_normN4C64"
ADVERSARY_LR = 1e-3
ADVERSARY_LR_MILESTONES = (60 / 240, 150 / 240)
ADVERSARY_LR_DECAY = 0.2


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed every epoch)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    mixture: entropy.MixtureState
    mixture_ready: (
        jax.Array
    )  # float32 scalar: 0 until the first mixture refresh (CEM off in epoch 1)
    step: jax.Array  # int32 scalar: optimizer steps taken
    adv: Any = None  # adversarial defense: the local decoder's params, batch stats and Adam state


class NaNLossError(FloatingPointError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


def multistep_schedule(
    lr: float,
    milestones: tuple[float, ...],
    decay: float,
    epochs: int,
    steps_per_epoch: int,
) -> optax.Schedule:
    """PyTorch's MultiStepLR stepped per epoch: ``lr · decay^(#milestones passed)``.

    ``milestones`` are fractions of ``epochs``; each is rounded to the nearest epoch, and none falls
    before the end of epoch 1 (a short run's first milestone would otherwise round to epoch 0 and
    start below the base rate, and ×5 above the base λ under the inverse_lr schedule).
    """
    scales: dict[int, float] = {}
    for m in milestones:
        boundary = max(1, int(math.floor(m * epochs + 0.5))) * steps_per_epoch
        scales[boundary] = scales.get(boundary, 1.0) * decay
    return optax.piecewise_constant_schedule(lr, scales)


def onecycle_steps(warmup_fraction: float, epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(W, T)`` of :func:`onecycle_schedule`: the warm-up's steps ``W = round(f·T)`` (kept in
    ``[1, T − 1]``) and the run's ``T = epochs · steps_per_epoch``."""
    total = int(epochs) * int(steps_per_epoch)
    warm = min(max(1, int(math.floor(warmup_fraction * total + 0.5))), max(1, total - 1))
    return warm, total


def onecycle_schedule(
    lr: float, warmup_fraction: float, epochs: int, steps_per_epoch: int
) -> optax.Schedule:
    """A triangular one-cycle, per optimizer step ``t`` of ``T = epochs · steps_per_epoch``:

        lr(t) = lr · min(t / W, (T − t) / (T − W)),  clipped to [0, lr],  W = round(warmup_fraction · T)

    a linear warm-up from 0 to the peak ``lr`` over the first ``W`` steps, then a linear decay to 0
    at step ``T`` (the last step taken, ``T − 1``, runs at ``lr / (T − W)``). The first step runs at
    0 and moves only the batch-norm statistics and the momentum (one step of ~2,000 at the
    ``cifar_full`` preset). airbench's schedule has this shape; its ends at 0.2 and 0.07 of the peak
    rest on its averaging of the weights, which this package does not do.
    """
    warm, total = onecycle_steps(warmup_fraction, epochs, steps_per_epoch)
    down = float(max(1, total - warm))

    def schedule(count: Any) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        return lr * jnp.clip(jnp.minimum(t / warm, (total - t) / down), 0.0, 1.0)

    return schedule


#: Under ``lr_schedule="onecycle"``, the most the ``inverse_lr`` λ schedule multiplies λ by
#: (:func:`inverse_lr_lambda`): ×25, the range of the quick preset's two ×0.2 decays, in which the
#: package's default λ was chosen (the frontier study: ×1, ×5, ×25).
INVERSE_LR_MAX_FACTOR = 25.0


def schedule_of(
    kind: str,
    lr: float,
    *,
    milestones: tuple[float, ...],
    decay: float,
    warmup_fraction: float,
    epochs: int,
    steps_per_epoch: int,
) -> optax.Schedule:
    """The learning-rate schedule named ``kind`` (``RunConfig.lr_schedule``): ``multistep``
    (:func:`multistep_schedule`) or ``onecycle`` (:func:`onecycle_schedule`)."""
    if kind == "onecycle":
        return onecycle_schedule(lr, warmup_fraction, epochs, steps_per_epoch)
    if kind != "multistep":
        raise ValueError(f"unknown lr_schedule {kind!r}; accepted: multistep, onecycle.")
    return multistep_schedule(lr, milestones, decay, epochs, steps_per_epoch)


def inverse_lr_lambda(
    lambd: float,
    kind: str,
    lr: float,
    schedule: optax.Schedule,
    step: Any,
    *,
    warmup_fraction: float,
    epochs: int,
    steps_per_epoch: int,
) -> jax.Array:
    """The CEM weight at ``step`` under the ``inverse_lr`` λ schedule: ``λ`` times a factor of the
    learning-rate schedule ``kind`` (``schedule``, peak or base rate ``lr`` = lr₀).

    ``multistep``: ``lr₀ / lr(t)`` (the reference's ``0.001/lr`` up to a constant: ×5 at every ×0.2
    decay, so the CEM term's step ``lr(t)·λ·lr₀/lr(t)`` stays ``λ·lr₀``). ``onecycle``: ``lr₀ / lr(t)``
    read on the decay alone and capped, ``1 / max(min(1, (T − t)/(T − W)), 1/25)``: 1 through the
    warm-up (the reference raises λ when the rate decays, never when it rises: its warm-up epoch has
    CEM off), then growing as the rate falls, up to :data:`INVERSE_LR_MAX_FACTOR` (×25, from the last
    1/25 of the decay on). Uncapped, ``lr₀/lr(t)`` would grow without bound as the rate reaches 0 and
    the CEM term alone would set the last steps; the reference caps its own factor too (``s = 1``
    below lr 0.00041: ×50 at its lr₀ 0.05).
    """
    if kind != "onecycle":
        return lambd * lr / schedule(step)
    warm, total = onecycle_steps(warmup_fraction, epochs, steps_per_epoch)
    t = jnp.asarray(step, jnp.float32)
    decayed = jnp.minimum(1.0, (total - t) / float(max(1, total - warm)))
    return lambd / jnp.maximum(decayed, 1.0 / INVERSE_LR_MAX_FACTOR)


def lr_schedule(cfg: RunConfig, steps_per_epoch: int) -> optax.Schedule:
    """The config's learning rate per optimizer step (``cfg.lr_schedule``).

    ``multistep`` (the default): ``lr · decay^(#milestones passed)``, milestones at fractions of the
    epochs (60/120/180/210 of 240); epoch 1 trains at the base rate (the reference's warm-up leaves it
    at 0, DESIGN §6). ``onecycle``: :func:`onecycle_schedule` with peak ``cfg.lr``.
    """
    return schedule_of(
        cfg.lr_schedule,
        cfg.lr,
        milestones=cfg.lr_milestones,
        decay=cfg.lr_decay,
        warmup_fraction=cfg.warmup_fraction,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
    )


def _adversary_schedule(epochs: int, steps_per_epoch: int) -> optax.Schedule:
    return multistep_schedule(
        ADVERSARY_LR, ADVERSARY_LR_MILESTONES, ADVERSARY_LR_DECAY, epochs, steps_per_epoch
    )


def adversary_lr_schedule(cfg: RunConfig, steps_per_epoch: int) -> optax.Schedule:
    """The adversarial defense's decoder rate: Adam 1e-3, ×0.2 after 25 % and 62.5 % of the run."""
    return _adversary_schedule(cfg.epochs, steps_per_epoch)


def adversary_optimizer(epochs: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam on :func:`adversary_lr_schedule`: what builds and what updates the local decoder."""
    return optax.adam(_adversary_schedule(epochs, steps_per_epoch))


def sgd_optimizer(
    schedule: optax.Schedule, weight_decay: float, momentum: float, nesterov: bool = False
) -> optax.GradientTransformation:
    """PyTorch-style SGD: coupled weight decay, then momentum (Nesterov's, as PyTorch's, with
    ``nesterov``), then the schedule (reference §5.1; the reference has no Nesterov)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )


def make_optimizer(cfg: RunConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """:func:`sgd_optimizer` on :func:`lr_schedule` with the config's weight decay and momentum."""
    return sgd_optimizer(
        lr_schedule(cfg, steps_per_epoch), cfg.weight_decay, cfg.momentum, cfg.nesterov
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of ``logits [B, C]`` against integer ``labels [B]``; with
    ``label_smoothing`` ε > 0 against the smoothed targets ``(1 − ε)·one_hot + ε/C``
    (``optax.smooth_labels``; PyTorch's ``CrossEntropyLoss(label_smoothing=ε)``)."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


@dataclasses.dataclass
class ModelParts:
    """A freshly initialised split model, split once into graph definitions and state."""

    graphdef: Any  # train mode
    graphdef_eval: Any
    params: Any
    batch_stats: Any
    rest: Any  # everything else (e.g. dropout RNG streams); constant during training
    feature_shape: tuple[int, int, int]


def build_model_parts(cfg: RunConfig, num_classes: int, image_size: int) -> ModelParts:
    """Builds ``cfg``'s split model (init key folded from ``cfg.seed``) and splits it."""
    cut = cfg.resolved_cut_layer
    model = build_split_model(
        cfg.arch,
        num_classes=num_classes,
        image_size=image_size,
        cut_layer=cut,
        bottleneck_channels=cfg.bottleneck_channels,
        rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), _TAG_INIT)),
    )
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    graphdef_eval, _, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    shape = feature_shape(
        cfg.arch, image_size=image_size, cut_layer=cut, bottleneck_channels=cfg.bottleneck_channels
    )
    return ModelParts(graphdef, graphdef_eval, params, batch_stats, rest, tuple(shape))


def initial_state(
    params: Any,
    batch_stats: Any,
    tx: optax.GradientTransformation,
    num_classes: int,
    clusters_per_class: int,
    feature_dim: int,
) -> TrainState:
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        mixture=entropy.init_mixture(num_classes, clusters_per_class, feature_dim),
        mixture_ready=jnp.zeros((), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )


def make_encode(
    model: Any, defense: defenses.Defense, mean: Any, std: Any
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``encode(key, images uint8 | [0,1] float) -> defense.obfuscate(key, client(images))``, a
    :class:`cem_jax.attacks.SplitEncode` (``.features`` the client, ``.obfuscate`` the defense's).

    ``model`` is a SplitModel in eval mode; it is split here, so the function is pure and traceable.
    """
    graphdef, params = nnx.split(model)
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)

    def features(images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).encode(data_lib.normalize(images, mean, std))

    # callable as encode(key, images); its two parts let the decoder attack run the client once
    return SplitEncode(features, defense.obfuscate)


class Adversary:
    """The adversarial defense's local decoder (attacker-aware training, reference §3.3).

    Unlike the reference, it is fitted on training data only (no pre-training on the test set) and
    on the features the server actually receives; one Adam step per training step maximises the SSIM
    of its reconstructions. This object only builds it: the steps use :class:`StepSpec`.
    """

    def __init__(self, decoder: Any, tx: optax.GradientTransformation) -> None:
        decoder.train()
        self.graphdef, params, batch_stats, self.rest = nnx.split(
            decoder, nnx.Param, nnx.BatchStat, ...
        )
        decoder.eval()
        self.graphdef_eval = nnx.split(decoder, nnx.Param, nnx.BatchStat, ...)[0]
        self._params, self._batch_stats = params, batch_stats
        self.tx = tx

    def init_state(self) -> dict[str, Any]:
        return {
            "params": self._params,
            "batch_stats": self._batch_stats,
            "opt_state": self.tx.init(self._params),
        }


def build_adversary(
    cfg: RunConfig,
    feature_shape: tuple[int, ...],
    image_size: int,
    steps_per_epoch: int,
) -> Adversary:
    """The local decoder and its optimizer (:func:`adversary_optimizer`)."""
    from cem_jax.models.decoder import decoder_from_name

    decoder = decoder_from_name(
        ADVERSARY_DECODER,
        in_channels=feature_shape[2],
        feature_size=feature_shape[0],
        image_size=image_size,
        rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), _TAG_ADV)),
    )
    return Adversary(decoder, adversary_optimizer(cfg.epochs, steps_per_epoch))


def state_template(
    cfg: RunConfig, parts: ModelParts, num_classes: int, image_size: int, steps_per_epoch: int = 1
) -> tuple[TrainState, dict[str, Any]]:
    """A fresh (host) :class:`TrainState` of ``cfg`` and the constant ``rest`` the steps take.

    The one template of every restore: resume, :func:`cem_jax.client.load_client`, re-attacks.
    ``rest`` is ``{"model": parts.rest, "adv": the local decoder's rest or None}``.
    """
    state, rest, _ = _template(cfg, parts, num_classes, image_size, steps_per_epoch)
    return state, rest


def _template(
    cfg: RunConfig, parts: ModelParts, num_classes: int, image_size: int, steps_per_epoch: int
) -> tuple[TrainState, dict[str, Any], Adversary | None]:
    state = initial_state(
        parts.params,
        parts.batch_stats,
        make_optimizer(cfg, steps_per_epoch),
        num_classes,
        cfg.resolved_clusters_per_class,
        int(np.prod(parts.feature_shape)),
    )
    rest: dict[str, Any] = {"model": parts.rest, "adv": None}
    adversary = None
    if cfg.defense_spec().adversarial_alpha > 0:
        adversary = build_adversary(cfg, parts.feature_shape, image_size, steps_per_epoch)
        state = state.replace(adv=adversary.init_state())
        rest["adv"] = adversary.rest
    return state, rest, adversary


# ------------------------------------------------------------------------------------ pure steps
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a run's steps: hashable, so equal configs share one compiled step.

    Built by :meth:`create` from the config and the model's graph definitions; the optimizer and
    the schedules are rebuilt from these numbers inside the traced steps.
    """

    graphdef: Any
    graphdef_eval: Any
    defense: defenses.Defense
    cem_mode: str
    lambda_schedule: str
    lr: float
    lr_milestones: tuple[float, ...]
    lr_decay: float
    epochs: int
    steps_per_epoch: int
    weight_decay: float
    momentum: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    adv_graphdef: Any = None  # the adversarial defense's local decoder (train mode), or None
    adv_graphdef_eval: Any = None
    lr_schedule: str = "multistep"
    warmup_fraction: float = 0.2
    nesterov: bool = False
    label_smoothing: float = 0.0
    augment_padding: int = 4

    @classmethod
    def create(
        cls,
        cfg: RunConfig,
        parts: ModelParts,
        *,
        steps_per_epoch: int,
        mean: Any,
        std: Any,
        adversary: Adversary | None = None,
    ) -> StepSpec:
        return cls(
            graphdef=parts.graphdef,
            graphdef_eval=parts.graphdef_eval,
            defense=cfg.defense_spec(),
            cem_mode=cfg.cem_mode,
            lambda_schedule=cfg.lambda_schedule,
            lr=float(cfg.lr),
            lr_milestones=tuple(float(m) for m in cfg.lr_milestones),
            lr_decay=float(cfg.lr_decay),
            epochs=int(cfg.epochs),
            steps_per_epoch=int(steps_per_epoch),
            weight_decay=float(cfg.weight_decay),
            momentum=float(cfg.momentum),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            adv_graphdef=None if adversary is None else adversary.graphdef,
            adv_graphdef_eval=None if adversary is None else adversary.graphdef_eval,
            lr_schedule=cfg.lr_schedule,
            warmup_fraction=float(cfg.warmup_fraction),
            nesterov=bool(cfg.nesterov),
            label_smoothing=float(cfg.label_smoothing),
            augment_padding=int(cfg.augment_padding),
        )

    def schedule(self) -> optax.Schedule:
        """:func:`lr_schedule` of the config this spec was built from."""
        return schedule_of(
            self.lr_schedule,
            self.lr,
            milestones=self.lr_milestones,
            decay=self.lr_decay,
            warmup_fraction=self.warmup_fraction,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
        )

    def inverse_lr_lambda(self, lambd: float, schedule: optax.Schedule, step: Any) -> jax.Array:
        """:func:`inverse_lr_lambda` of this spec's schedule at ``step``."""
        return inverse_lr_lambda(
            lambd,
            self.lr_schedule,
            self.lr,
            schedule,
            step,
            warmup_fraction=self.warmup_fraction,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
        )

    def tx(self) -> optax.GradientTransformation:
        """:func:`make_optimizer` of the config this spec was built from."""
        return sgd_optimizer(self.schedule(), self.weight_decay, self.momentum, self.nesterov)

    def adversary_tx(self) -> optax.GradientTransformation:
        return adversary_optimizer(self.epochs, self.steps_per_epoch)

    def model(self, state: TrainState, rest: dict[str, Any], *, train: bool = False) -> Any:
        """The nnx SplitModel holding ``state``'s weights (eval mode unless ``train``)."""
        graphdef = self.graphdef if train else self.graphdef_eval
        return nnx.merge(graphdef, state.params, state.batch_stats, rest["model"], copy=True)


#: How often each step function was traced (a test checks that equal configs compile once).
TRACES: collections.Counter[str] = collections.Counter()


def _adversary_apply(
    spec: StepSpec, adv: dict[str, Any], rest: Any, z: jax.Array, *, train: bool
) -> tuple[jax.Array, Any]:
    graphdef = spec.adv_graphdef if train else spec.adv_graphdef_eval
    decoder = nnx.merge(graphdef, adv["params"], adv["batch_stats"], rest, copy=True)
    return decoder(z), nnx.state(decoder, nnx.BatchStat)


def _adversary_update(
    spec: StepSpec, adv: dict[str, Any], rest: Any, z: jax.Array, x01: jax.Array
) -> tuple[dict[str, Any], jax.Array]:
    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        rec, batch_stats = _adversary_apply(spec, {**adv, "params": params}, rest, z, train=True)
        return -jnp.mean(metrics_lib.ssim(rec, x01)), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(adv["params"])
    tx = spec.adversary_tx()
    updates, opt_state = tx.update(grads, adv["opt_state"], adv["params"])
    params = optax.apply_updates(adv["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss


def train_step(
    spec: StepSpec,
    state: TrainState,
    rest: dict[str, Any],
    batch: dict[str, jax.Array],
    key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One defended training step (pure): augment → client → defense → server → losses → SGD.

    ``batch``: ``{"images": uint8 [B, H, W, 3], "labels": int32 [B]}``; ``key``: the run's training
    key, folded here with ``state.step``. Returns the new state and the step's scalar metrics
    (``loss``, ``ce``, ``train_acc``, ``lr``, and ``cem`` / ``dcor`` / ``adv_ssim`` / ``adv_loss``
    where the defense has them). Jitted per (spec, mesh) by :func:`compiled_steps`.
    """
    TRACES["train"] += 1
    d = spec.defense
    images, labels = batch["images"], batch["labels"]
    key = jax.random.fold_in(key, state.step)
    k_aug, k_def, k_drop = jax.random.split(key, 3)
    x01 = data_lib.augment(k_aug, images, padding=spec.augment_padding)
    x = data_lib.normalize(x01, spec.mean, spec.std)
    model = spec.model(state, rest, train=True)
    schedule = spec.schedule()
    adversarial = spec.adv_graphdef is not None

    def loss_fn(model: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        z = model.encode(x)
        z_sent = d.obfuscate(k_def, z)
        logits = model.classify(z_sent, rngs=nnx.Rngs(dropout=k_drop))
        ce = cross_entropy(logits, labels, spec.label_smoothing)
        total = ce
        aux = {"ce": ce, "train_acc": jnp.mean(jnp.argmax(logits, -1) == labels)}
        if d.cem:
            lc = entropy.cem_loss(z, labels, state.mixture, sigma=d.sigma, mode=spec.cem_mode)
            lambd = d.lambd
            if spec.lambda_schedule == "inverse_lr":  # the reference's λ·0.001/lr, DESIGN §6
                lambd = spec.inverse_lr_lambda(lambd, schedule, state.step)
            total = total + lambd * state.mixture_ready * lc
            aux["cem"] = lc
        if d.nopeek_alpha > 0:
            dcor = defenses.distance_correlation(x, z)
            total = total + d.nopeek_alpha * dcor
            aux["dcor"] = dcor
        if adversarial:
            # the local attacker (eval mode) inverts what the server receives; the client is
            # penalised when its reconstructions get too good: α·max(0, SSIM − threshold)
            rec = _adversary_apply(spec, state.adv, rest["adv"], z_sent, train=False)[0]
            ssim = jnp.mean(metrics_lib.ssim(rec, x01))
            total = total + d.adversarial_penalty(ssim)
            aux["adv_ssim"] = ssim
            aux["_z_sent"] = z_sent
        aux["loss"] = total
        return total, aux

    (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    updates, opt_state = spec.tx().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        params=params,
        batch_stats=nnx.state(model, nnx.BatchStat),
        opt_state=opt_state,
        step=state.step + 1,
    )
    if adversarial:
        z_sent = jax.lax.stop_gradient(aux.pop("_z_sent"))
        new_adv, aux["adv_loss"] = _adversary_update(spec, state.adv, rest["adv"], z_sent, x01)
        new_state = new_state.replace(adv=new_adv)
    aux["lr"] = schedule(state.step)
    return new_state, aux


def eval_step(
    spec: StepSpec,
    state: TrainState,
    rest: dict[str, Any],
    batch: dict[str, jax.Array],
    key: jax.Array,
) -> dict[str, jax.Array]:
    """Clean and defended correct counts of one (padded) test batch (pure).

    ``batch``: ``{"images" [B, H, W, 3], "labels" [B], "mask" float [B]}`` (0 on padding rows).
    ``nonfinite`` counts the real images whose features or logits are not finite.
    """
    TRACES["eval"] += 1
    model = spec.model(state, rest)
    images, labels, mask = batch["images"], batch["labels"], batch["mask"]
    z = model.encode(data_lib.normalize(images, spec.mean, spec.std))
    logits_clean = model.classify(z)
    logits_defended = model.classify(spec.defense.obfuscate(key, z))
    clean = jnp.argmax(logits_clean, -1) == labels
    defended = jnp.argmax(logits_defended, -1) == labels

    def finite(a: jax.Array) -> jax.Array:
        return jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=-1)

    ok = finite(z) & finite(logits_clean) & finite(logits_defended)
    return {
        "clean_correct": jnp.sum(clean * mask),
        "defended_correct": jnp.sum(defended * mask),
        "nonfinite": jnp.sum((~ok) * mask),  # test images with a NaN/inf feature or logit
    }


def feature_step(
    spec: StepSpec, state: TrainState, rest: dict[str, Any], images: jax.Array
) -> jax.Array:
    """Clean client features (eval mode, no noise) of ``images [B, H, W, 3]``: ``[B, D]`` (pure)."""
    TRACES["features"] += 1
    z = spec.model(state, rest).encode(data_lib.normalize(images, spec.mean, spec.std))
    return z.reshape(z.shape[0], -1)


class Steps(NamedTuple):
    """The jitted steps of one (spec, mesh): ``train(state, rest, batch, key)`` (state donated),
    ``eval(state, rest, batch, key)``, ``features(state, rest, images)``."""

    train: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[..., dict[str, jax.Array]]
    features: Callable[..., jax.Array]


@functools.lru_cache(maxsize=32)
def compiled_steps(spec: StepSpec, mesh: Mesh) -> Steps:
    """The steps of ``spec`` jitted over ``mesh`` with explicit shardings, once per (spec, mesh).

    State, ``rest`` and keys are replicated, batches split along the mesh's ``data`` axis; the
    train step's state is donated and comes back replicated.
    """
    rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return Steps(
        train=jax.jit(
            functools.partial(train_step, spec),
            in_shardings=(rep, rep, bat, rep),
            out_shardings=(rep, rep),
            donate_argnums=(0,),
        ),
        eval=jax.jit(
            functools.partial(eval_step, spec),
            in_shardings=(rep, rep, bat, rep),
            out_shardings=rep,
        ),
        features=jax.jit(
            functools.partial(feature_step, spec),
            in_shardings=(rep, rep, bat),
            out_shardings=bat,
        ),
    )


# ------------------------------------------------------------------------------------ host loops
class Trainer:
    """The host side of a run: feeds batches to the shared jitted steps, evaluates, refreshes the
    mixture. Holds no device copy of the data: every step's batch is gathered on the host, each
    process reading only the rows its devices hold (DESIGN §5)."""

    #: Steps whose metrics stay on the device before the host fetches (and checks) them at once.
    metrics_every: int = 16

    def __init__(
        self, cfg: RunConfig, dataset: data_lib.Dataset, *, mesh: Mesh | None = None
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dataset = dataset
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        parallel.check_batch_size(cfg.batch_size, self.mesh)
        self.defense = cfg.defense_spec()
        self.num_classes = dataset.num_classes
        self.image_size = dataset.image_size
        self.cut_layer = cfg.resolved_cut_layer
        self.clusters = cfg.resolved_clusters_per_class
        self.feature_shape = feature_shape(
            cfg.arch,
            image_size=self.image_size,
            cut_layer=self.cut_layer,
            bottleneck_channels=cfg.bottleneck_channels,
        )  # checked before building anything, so a bad image size fails fast
        self.feature_dim = int(np.prod(self.feature_shape))
        if cfg.batch_size > dataset.num_train:
            raise ValueError(
                f"batch_size={cfg.batch_size} is larger than the training set ({dataset.num_train})."
            )
        self.steps_per_epoch = dataset.num_train // cfg.batch_size
        self.key = jax.random.key(cfg.seed)
        self.mean = tuple(float(m) for m in dataset.mean)
        self.std = tuple(float(s) for s in dataset.std)

        parts = build_model_parts(cfg, self.num_classes, self.image_size)
        self._template, rest, adversary = _template(
            cfg, parts, self.num_classes, self.image_size, self.steps_per_epoch
        )
        self.spec = StepSpec.create(
            cfg,
            parts,
            steps_per_epoch=self.steps_per_epoch,
            mean=self.mean,
            std=self.std,
            adversary=adversary,
        )
        self.rest = parallel.replicate(rest, self.mesh)
        self.train_key = parallel.replicate(jax.random.fold_in(self.key, _TAG_TRAIN), self.mesh)
        self.steps = compiled_steps(self.spec, self.mesh)
        self.train_labels = np.asarray(dataset.train_labels, np.int32)

    # --------------------------------------------------------------------------- construction
    def init_state(self) -> TrainState:
        """A fresh, replicated :class:`TrainState` (also the template a checkpoint restores into).

        A new copy on every call: the train step donates (deletes) the state it is given, which
        must never be the template's own buffers.
        """
        state = parallel.replicate(self._template, self.mesh)
        return jax.device_put(state, parallel.replicated(self.mesh), may_alias=False)

    def model(self, state: TrainState, *, train: bool = False) -> Any:
        """The nnx SplitModel holding ``state``'s weights (eval mode unless ``train``)."""
        return self.spec.model(state, self.rest, train=train)

    def _preprocess(self, images: jax.Array) -> jax.Array:
        return data_lib.normalize(images, self.mean, self.std)

    # --------------------------------------------------------------------------- steps
    def batch(self, idx: np.ndarray) -> dict[str, jax.Array]:
        """The global training batch of the indices ``idx [B]``: each process gathers its rows."""
        idx = np.asarray(idx)
        images, labels = self.dataset.train_images, self.train_labels
        return parallel.process_batch(
            lambda lo, hi: {"images": images[idx[lo:hi]], "labels": labels[idx[lo:hi]]},
            len(idx),
            self.mesh,
        )

    def step(self, state: TrainState, idx: np.ndarray) -> tuple[TrainState, dict[str, jax.Array]]:
        """One training step on the training images ``idx`` (``state`` is donated)."""
        return self.steps.train(state, self.rest, self.batch(idx), self.train_key)

    # --------------------------------------------------------------------------- host loops
    def epoch_order(self, epoch: int) -> np.ndarray:
        """``[steps_per_epoch, batch_size]`` training indices of ``epoch`` (1-based)."""
        key = jax.random.fold_in(jax.random.fold_in(self.key, _TAG_ORDER), epoch)
        return np.asarray(
            data_lib.epoch_batches(key, self.dataset.num_train, self.cfg.batch_size), np.int32
        )

    def train_epoch(
        self,
        state: TrainState,
        epoch: int,
        *,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> tuple[TrainState, dict[str, float]]:
        """One pass over the training set. Raises :class:`NaNLossError` on a non-finite loss.

        The steps' metrics stay on the device; the host fetches them (one transfer) every
        :attr:`metrics_every` steps (and after the first) and at the end of the epoch, then checks
        each step's loss in order and calls ``on_step(i, metrics)`` for each (``i`` = steps done,
        1-based). The next batch is gathered and sent while the device runs the current step.
        """
        order = self.epoch_order(epoch)
        sums: dict[str, float] = {}
        pending: list[dict[str, jax.Array]] = []
        start = time.perf_counter()
        first_done = None

        def drain(done: int) -> None:
            fetched = jax.device_get(pending)  # one host sync for the whole window
            for j, metrics in enumerate(fetched, start=done - len(fetched) + 1):
                values = self._check_and_accumulate(metrics, sums, epoch, j)
                if on_step is not None:
                    on_step(j, values)
            pending.clear()

        with jax.set_mesh(self.mesh):
            for i, idx in enumerate(order):
                state, metrics = self.step(state, idx)
                pending.append(metrics)
                if i == 0:
                    jax.block_until_ready(metrics["loss"])
                    first_done = time.perf_counter()
                # the first step (compiled, waited for above) is reported at once: progress rates
                # start from it; then one fetch per window
                if i == 0 or len(pending) >= self.metrics_every:
                    drain(i + 1)
            if pending:
                drain(len(order))
        elapsed = time.perf_counter() - start
        n = max(1, len(order))
        out = {k: v / n for k, v in sums.items()}
        steady = time.perf_counter() - (first_done or start)
        out["steps_per_s"] = (n - 1) / steady if n > 1 and steady > 0 else n / max(elapsed, 1e-9)
        out["epoch_time_s"] = elapsed
        return state, out

    def _check_and_accumulate(
        self, metrics: dict[str, Any], sums: dict[str, float], epoch: int, step: int
    ) -> dict[str, float]:
        values = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise NaNLossError(
                f"non-finite loss ({values['loss']}) at epoch {epoch}, step {step} of "
                f"{self.steps_per_epoch} (cross-entropy {values['ce']}"
                + (f", L_C {values['cem']}" if "cem" in values else "")
                + "). Training stopped; the last good checkpoint is kept. Lower --lr or --lambd."
            )
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        return values

    def _fed_batches(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """``(b, batch)`` over ``images`` in eval-size batches, the last one zero-padded (``mask``
        0 there) to a multiple of the devices; each process reads only its own rows."""
        n = len(images)
        bs = parallel.padded_rows(min(self.cfg.eval_batch_size, max(n, 1)), self.mesh)
        for b in range(int(math.ceil(n / bs))):
            sl = slice(b * bs, min(n, (b + 1) * bs))

            def rows(lo: int, hi: int, sl: slice = sl) -> dict[str, np.ndarray]:
                x, y, m = _pad(images[sl], labels[sl], bs)
                return {"images": x[lo:hi], "labels": y[lo:hi], "mask": m[lo:hi]}

            yield b, parallel.process_batch(rows, bs, self.mesh)

    def evaluate(self, state: TrainState, epoch: int) -> dict[str, float]:
        """Clean and defended top-1 on the test set (defense obfuscation with fresh noise)."""
        images, labels = self.dataset.test_images, self.dataset.test_labels
        n = len(labels)
        key = jax.random.fold_in(jax.random.fold_in(self.key, _TAG_EVAL), epoch)
        outs = []
        with jax.set_mesh(self.mesh):
            for b, batch in self._fed_batches(images, labels):
                key_b = parallel.replicate(jax.random.fold_in(key, b), self.mesh)
                outs.append(self.steps.eval(state, self.rest, batch, key_b))
        # the per-batch counts stay on the devices until here: one host sync per evaluation
        fetched = jax.device_get(outs)
        clean = sum(float(o["clean_correct"]) for o in fetched)
        defended = sum(float(o["defended_correct"]) for o in fetched)
        nonfinite = sum(float(o["nonfinite"]) for o in fetched)
        self.last_eval_nonfinite = int(nonfinite)  # read by check_finite before a checkpoint
        return {"clean_acc": clean / n, "defended_acc": defended / n}

    def check_finite(self, state: TrainState, metrics: dict[str, float], epoch: int) -> None:
        """Raises :class:`NaNLossError` unless the state and the epoch's evaluation are finite.

        The loss of a step is computed before its update, so a blow-up on the last step of an epoch
        shows only in the parameters it leaves behind and in what they compute: every parameter,
        batch statistic, optimizer and mixture entry, the test-set features and logits of the last
        :meth:`evaluate`, and the epoch's metrics must be finite before a checkpoint is written.
        """
        where = (
            f"after epoch {epoch} (its {self.steps_per_epoch} step(s) all had a finite loss, so the "
            "blow-up came with the last update)"
        )
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept"
            if epoch > 1
            else "no checkpoint was written"
        )
        tail = f". Training stopped before writing this epoch's checkpoint; {kept}. Lower --lr or --lambd."
        bad = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
            and not bool(jnp.all(jnp.isfinite(leaf)))
        ]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise NaNLossError(f"non-finite values in the train state {where}: {shown}{tail}")
        nonfinite = getattr(self, "last_eval_nonfinite", 0)
        if nonfinite:
            raise NaNLossError(
                f"the client's features or the server's logits are non-finite on {nonfinite} of "
                f"{self.dataset.num_test} test images {where}{tail}"
            )
        bad_metrics = sorted(
            k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)
        )
        if bad_metrics:
            raise NaNLossError(
                f"non-finite epoch metrics {where}: "
                + ", ".join(f"{k}={metrics[k]}" for k in bad_metrics)
                + tail
            )

    def features(self, state: TrainState, images: np.ndarray) -> jax.Array:
        """Clean client features (eval mode, no noise), flattened: ``[N', D]``, split along the
        mesh's ``data`` axis.

        ``N'`` is ``N`` rounded up to a multiple of the devices (:func:`cem_jax.parallel.padded_rows`);
        the rows past ``N`` are padding, to be labelled ``-1`` (:func:`feature_labels`). Batches are
        fed like training batches (each process its own rows) and the features stay on the devices
        that computed them: k-means and the certificate work on them sharded.
        """
        n = len(images)
        chunks = []
        with jax.set_mesh(self.mesh):
            for _, batch in self._fed_batches(images, np.zeros(n, np.int32)):
                chunks.append(self.steps.features(state, self.rest, batch["images"]))
            rows = parallel.padded_rows(n, self.mesh)
            return _stack_rows(chunks, rows, parallel.batch_sharding(self.mesh))

    def features_fn(self, state: TrainState) -> Callable[[np.ndarray], jax.Array]:
        """``images [N, H, W, 3] -> [N, D]`` clean features of ``state``'s client (see :meth:`features`)."""
        return functools.partial(self.features, state)

    def refresh_mixture(
        self, state: TrainState, epoch: int, *, full_bound: bool = False
    ) -> tuple[TrainState, dict[str, float]]:
        """Re-fits the per-class mixture on a clean pass over the training set (DESIGN §1).

        k-means++ the first time, warm-started from the previous centroids afterwards. Also returns the
        diagonal leakage bound (bits per image) of the current client on the training set, and with
        ``full_bound`` the full-covariance one (``leakage_bits_full``) from the same feature pass.
        """
        start = time.perf_counter()
        key = jax.random.fold_in(jax.random.fold_in(self.key, _TAG_KMEANS), epoch)
        previous = state.mixture if float(state.mixture_ready) > 0 else None
        mixture, out = refresh_mixture(
            self.features_fn(state),
            self.dataset.train_images,
            self.train_labels,
            num_classes=self.num_classes,
            clusters_per_class=self.clusters,
            key=key,
            previous=previous,
            iterations=self.cfg.kmeans_iterations,
            sigma=self.defense.sigma,
            full_bound=full_bound,
            mesh=self.mesh,
        )
        out["mixture_time_s"] = time.perf_counter() - start
        ready = parallel.replicate(jnp.ones((), jnp.float32), self.mesh)
        state = state.replace(mixture=mixture, mixture_ready=ready)
        return state, out

    def leakage_bound(self, state: TrainState, *, covariance: str = "full") -> float:
        """The leakage bound (bits per image) of the client on the training set."""
        if self.defense.sigma <= 0:
            return float("inf")  # no noise: the features can carry unbounded information
        if float(state.mixture_ready) == 0:
            state, _ = self.refresh_mixture(state, 0)
        feats = self.features(state, self.dataset.train_images)
        labels = feature_labels(self.train_labels, self.mesh)
        with jax.set_mesh(self.mesh):
            return float(
                entropy.leakage_upper_bound(
                    feats, labels, state.mixture, sigma=self.defense.sigma, covariance=covariance
                )
            )

    def client_fn(
        self, state: TrainState, *, noise_only: bool = False, clean: bool = False
    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The trained client as a black box: ``encode(key, images uint8|[0,1]) -> transmitted z``.

        By default it applies every obfuscation of the defense (what the server receives); with
        ``noise_only`` only the Gaussian noise (the reference attacker's simulation, §6.1); with
        ``clean`` none (the differentiable copy a white-box attacker inverts).
        """
        defense = self.defense
        if noise_only:
            defense = dataclasses.replace(defense, dropout_ratio=0.0, topk_ratio=0.0)
        if clean:
            defense = dataclasses.replace(
                defense, sigma=0.0, dropout_ratio=0.0, topk_ratio=0.0, cem=False, lambd=0.0
            )
        return make_encode(self.model(state), defense, self.dataset.mean, self.dataset.std)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _stack_rows(chunks: list[jax.Array], rows: int, sharding: NamedSharding) -> jax.Array:
    """The first ``rows`` rows of the concatenated ``chunks``, split as ``sharding`` says."""
    return jax.lax.with_sharding_constraint(jnp.concatenate(chunks)[:rows], sharding)


def feature_labels(labels: np.ndarray, mesh: Mesh) -> jax.Array:
    """The labels of :meth:`Trainer.features`' rows: ``labels`` then ``-1`` on the padding rows,
    split along ``data`` like the features (each process places its own rows)."""
    return parallel.shard_rows(np.asarray(labels, np.int32), mesh, fill=kmeans.PAD_LABEL)


def refresh_mixture(
    features: Callable[[np.ndarray], jax.Array],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    clusters_per_class: int,
    key: jax.Array,
    previous: entropy.MixtureState | None,
    iterations: int,
    sigma: float,
    full_bound: bool,
    mesh: Mesh,
) -> tuple[entropy.MixtureState, dict[str, float]]:
    """Fits the per-class mixture on ``features(images)`` (one clean pass); with noise, also the
    diagonal leakage bound (``leakage_bits``) and, with ``full_bound``, the full-covariance one.

    ``features`` is any ``images -> [N', D]`` function (:meth:`Trainer.features_fn`, or a restored
    client's; ``N' >= N``, the rows past ``N`` padding): nothing here needs a :class:`Trainer`. On a
    mesh of several devices the features stay split along ``data`` and k-means runs sharded
    (:mod:`cem_jax.kmeans`, ``method="segments"``); on one device it runs per class.
    """
    feats = features(images)
    labels = feature_labels(labels, mesh)
    with jax.set_mesh(mesh):
        mixture = entropy.fit_mixture(
            feats,
            labels,
            num_classes=num_classes,
            clusters_per_class=clusters_per_class,
            key=key,
            previous=previous,
            iterations=iterations,
        )
        mixture = parallel.replicate(mixture, mesh)
        out: dict[str, float] = {}
        if sigma > 0:
            out["leakage_bits"] = float(
                entropy.leakage_upper_bound(feats, labels, mixture, sigma=sigma)
            )
            if full_bound:
                out["leakage_bits_full"] = float(
                    entropy.leakage_upper_bound(
                        feats, labels, mixture, sigma=sigma, covariance="full"
                    )
                )
    return mixture, out


def _pad(
    images: np.ndarray, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(labels)
    mask = np.zeros(size, np.float32)
    mask[:n] = 1
    if n == size:
        return images, labels, mask
    pad_img = np.zeros((size - n, *images.shape[1:]), images.dtype)
    return (
        np.concatenate([images, pad_img]),
        np.concatenate([labels, np.zeros(size - n, labels.dtype)]),
        mask,
    )


# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    trainer: Trainer
    state: TrainState
    history: list[dict[str, float]]
    final: dict[str, float]
    wall_time_s: float  # training's wall time in all, the processes before a resume included
    resumed_from_epoch: int
    prior_wall_time_s: float = 0.0  # the part spent before this process resumed the run


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of another configuration (or another version, or other data)."""


class DatasetMismatchError(IncompatibleCheckpointError):
    """The workdir was trained on other data than this run loads."""


# What decides "the same data" (``name`` and ``source`` are informative: the data may have moved).
DATASET_KEYS = ("digest", "class_names", "num_train", "num_test")


def describe_dataset(identity: dict[str, Any]) -> str:
    """One line naming a :func:`cem_jax.data.dataset_identity` for an error message."""
    classes = identity.get("class_names")
    n = len(classes) if isinstance(classes, list | tuple) else "?"
    digest = str(identity.get("digest", "?"))[:12]
    return (
        f"{identity.get('name')!r} from {identity.get('source')} ({n} classes, "
        f"{identity.get('num_train')} train / {identity.get('num_test')} test images, "
        f"sha256 {digest}...)"
    )


def check_same_dataset(stored: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Refuses to reuse ``where`` (a checkpoint, a results.json) computed on other data.

    ``stored`` is what was recorded (None or without a digest: written before datasets were
    recorded, accepted). ``current`` is :func:`cem_jax.data.dataset_identity` of the data loaded now.
    """
    if not stored or "digest" not in stored:
        return
    diff = [k for k in DATASET_KEYS if _jsonable(stored.get(k)) != _jsonable(current.get(k))]
    if diff:
        raise DatasetMismatchError(
            f"{where} was computed on dataset {describe_dataset(stored)}, but this run loads "
            f"dataset {describe_dataset(current)}; they differ in {', '.join(diff)}. Refusing to "
            "resume, reuse or mix two datasets: repeat the original --dataset / --data_dir, or use "
            "another --workdir."
        )


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def check_compatible(
    meta: dict[str, Any],
    cfg: RunConfig,
    directory: str,
    dataset: dict[str, Any] | None = None,
) -> None:
    """Refuses to resume a checkpoint written by another configuration, format version or dataset.

    ``dataset`` (a :func:`cem_jax.data.dataset_identity`) is compared with the one the checkpoint
    recorded; a checkpoint written before datasets were recorded is compared by class count only.
    """
    if meta.get("format_version") != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{directory} holds a checkpoint of format {meta.get('format_version')!r}; this version "
            f"reads format {FORMAT_VERSION}. Use another --workdir."
        )
    diff = fingerprint_diff(meta.get("fingerprint", {}), cfg.training_fingerprint())
    if diff:
        lines = ", ".join(
            f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(diff.items())
        )
        raise IncompatibleCheckpointError(
            f"{directory} holds a checkpoint of another configuration ({lines}). Refusing to resume "
            "or overwrite it: use another --workdir, or repeat the original flags to resume."
        )
    if dataset is None:
        return
    if "dataset" in meta:
        check_same_dataset(meta["dataset"], dataset, f"the checkpoint in {directory}")
    elif meta.get("num_classes") not in (None, len(dataset["class_names"])):
        raise DatasetMismatchError(
            f"the checkpoint in {directory} was trained on {meta['num_classes']} classes, but this "
            f"run loads dataset {describe_dataset(dataset)}. Refusing to resume on other data: "
            "repeat the original --dataset / --data_dir, or use another --workdir."
        )


def checkpoint_meta(
    cfg: RunConfig,
    trainer: Trainer,
    epoch: int,
    history: list[dict[str, float]],
    dataset: dict[str, Any],
    wall_time_s: float | None = None,
) -> dict[str, Any]:
    """The JSON item saved beside the state of ``epoch`` (what :mod:`cem_jax.client` reads back);
    ``wall_time_s``: the training's wall time up to this checkpoint, every process counted."""
    ds = trainer.dataset
    return {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "train_wall_time_s": wall_time_s,
        "finished": epoch == cfg.epochs,
        "config": cfg.to_dict(),
        "fingerprint": cfg.training_fingerprint(),
        "history": history,
        "num_classes": ds.num_classes,
        "image_size": ds.image_size,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "feature_shape": list(trainer.feature_shape),
        "dataset": dataset,
    }


def train(
    cfg: RunConfig,
    dataset: data_lib.Dataset,
    *,
    workdir: str | None = None,
    mesh: Mesh | None = None,
    on_epoch_start: Callable[[int, Trainer], None] | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    on_resume: Callable[[list[dict[str, float]]], None] | None = None,
    max_to_keep: int = 3,
    dataset_identity: dict[str, Any] | None = None,
) -> TrainResult:
    """Trains (or resumes) a defended split model; checkpoints every epoch into ``workdir``.

    Per epoch: train loss, ``L_C``, clean/defended test accuracy, the diagonal leakage bound (bits per
    image, from the refreshed mixture) and steps/s go into the history. A killed run re-started with
    the same config, data and workdir resumes after its last completed epoch (``on_resume(history)``
    is called with the restored history); a damaged newest checkpoint is skipped and set aside. Each
    epoch's state and evaluation must be finite (:meth:`Trainer.check_finite`) before its checkpoint
    is written. ``dataset_identity`` (default: computed) is recorded with every checkpoint.
    """
    start = time.perf_counter()
    trainer = Trainer(cfg, dataset, mesh=mesh)
    identity = dataset_identity or data_lib.dataset_identity(dataset)
    state = trainer.init_state()
    history: list[dict[str, float]] = []
    first_epoch = 1
    prior_s = 0.0
    ckpt = None
    if workdir is not None:
        ckpt = Checkpointer(f"{workdir}/checkpoints", max_to_keep=max_to_keep)
        if ckpt.all_steps():
            state, meta = ckpt.restore(
                state, check=lambda m: check_compatible(m, cfg, ckpt.directory, identity)
            )
            if ckpt.skipped:  # damaged steps would block re-saving those epochs
                if parallel.is_main_process():  # one process moves them; the others reload
                    ckpt.set_aside_skipped()
                parallel.barrier("cem_jax:damaged_set_aside")
                if not parallel.is_main_process():
                    ckpt.set_aside_skipped()
            history = list(meta["history"])
            first_epoch = int(meta["epoch"]) + 1
            prior_s = previous_wall_time_s(meta)
            logging.info("resuming %s after epoch %d", workdir, first_epoch - 1)
            if on_resume is not None:
                on_resume(history)
    resumed_from = first_epoch - 1
    for epoch in range(first_epoch, cfg.epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch, trainer)
        step_cb = None if on_step is None else (lambda i, m, e=epoch: on_step(e, i, m))
        state, metrics = trainer.train_epoch(state, epoch, on_step=step_cb)
        metrics.update(trainer.evaluate(state, epoch))
        if trainer.defense.cem or trainer.defense.sigma > 0:
            # the last refresh also gives the final full-covariance certificate (same feature pass)
            state, mix = trainer.refresh_mixture(state, epoch, full_bound=epoch == cfg.epochs)
            metrics.update(mix)
        metrics["epoch"] = epoch
        trainer.check_finite(state, metrics, epoch)  # nothing non-finite reaches a checkpoint
        history.append(metrics)
        if ckpt is not None:
            elapsed = prior_s + time.perf_counter() - start
            ckpt.save(
                epoch, state, checkpoint_meta(cfg, trainer, epoch, history, identity, elapsed)
            )
            fault_point("after_checkpoint", epoch)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    final = dict(history[-1]) if history else {}
    if ckpt is not None:
        ckpt.close()
    return TrainResult(
        trainer=trainer,
        state=state,
        history=history,
        final=final,
        wall_time_s=prior_s + time.perf_counter() - start,
        resumed_from_epoch=resumed_from,
        prior_wall_time_s=prior_s,
    )


def previous_wall_time_s(meta: dict[str, Any]) -> float:
    """Training wall time before the checkpoint ``meta`` was written, every process counted: its
    ``train_wall_time_s``, or for a checkpoint written without it the sum of its history's
    ``epoch_time_s`` (the train steps alone: a lower bound, evaluations left out)."""
    recorded = meta.get("train_wall_time_s")
    if isinstance(recorded, int | float):
        return float(recorded)
    return float(sum(float(h.get("epoch_time_s", 0.0)) for h in meta.get("history", [])))
