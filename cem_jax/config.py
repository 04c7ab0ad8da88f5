"""What a run is: one frozen dataclass, the presets, and its validation.

``experiments/run.py`` turns flags into a :class:`RunConfig` with :func:`make_config`; the library only
ever sees the dataclass. A config that fails :meth:`RunConfig.validate` never starts training.

>>> cfg = make_config("quick", defense="cem_noise", sigma=0.1)
>>> cfg.epochs, cfg.defense
(6, 'cem_noise')
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any

from cem_jax import defenses
from cem_jax.data import TFDS_PREFIX
from cem_jax.models import ARCHS, default_cut_layer

#: The named datasets; besides them ``tfds:NAME`` names a dataset prepared with tensorflow-datasets
#: (:func:`cem_jax.data.load_tfds`).
DATASETS = ("cifar10", "cifar100", "facescrub", "tinyimagenet", "synthetic")
CEM_MODES = ("gmm", "reference")
LAMBDA_SCHEDULES = ("constant", "inverse_lr")
#: Learning-rate schedules (cem_jax.train.lr_schedule): the reference's step decays, or a one-cycle.
LR_SCHEDULES = ("multistep", "onecycle")
ATTACKS = ("decoder", "gan", "whitebox")
ATTACK_SETTINGS = ("train_time", "inference_time")
THREAT_MODELS = ("server_view", "noise_only")
#: Config fields that only the attacks read (outside the training fingerprint).
ATTACK_PREFIXES = ("attack", "gan", "whitebox")
#: The training fingerprint's entry for the defense a run trains with: its preset resolved with the
#: config's overrides (:meth:`RunConfig.defense_spec`), so that a changed preset (say the cem_*
#: presets' λ) is told apart from the runs made before it, although the config reads the same.
RESOLVED_DEFENSE = "resolved_defense"
#: RunConfig fields that reach training only through the resolved defense.
DEFENSE_OVERRIDES = (
    "sigma",
    "lambd",
    "dropout_ratio",
    "dropout_rescale",
    "topk_ratio",
    "topk_scope",
    "nopeek_alpha",
    "adversarial_alpha",
    "ssim_threshold",
)
#: Training fields added after runs were recorded, each with the value that trains exactly as before
#: the field existed. At that value a field is left out of the training fingerprint, so checkpoints and
#: records made before it still resume and count as the same runs (:func:`dict_diff` reads a missing
#: key as ``None``, which would not equal ``False`` or ``0.0``).
ADDED_TRAINING_FIELDS: dict[str, Any] = {
    "lr_schedule": "multistep",
    "nesterov": False,
    "label_smoothing": 0.0,
    "augment_padding": 4,
}
#: The fields each learning-rate schedule reads; the fingerprint leaves out the other schedule's.
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    "multistep": ("lr_milestones", "lr_decay"),
    "onecycle": ("warmup_fraction",),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run. ``None`` means "the default of the arch/defense"."""

    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    # split model
    arch: str = "vgg11_bn_sgm"
    cut_layer: int | None = None
    bottleneck_channels: int = 8
    # defense (None: the defense preset's default, see cem_jax.defenses.DEFENSES)
    defense: str = "cem_noise"
    sigma: float | None = None
    lambd: float | None = None
    dropout_ratio: float | None = None
    dropout_rescale: bool | None = None
    topk_ratio: float | None = None
    topk_scope: str | None = None
    nopeek_alpha: float | None = None
    adversarial_alpha: float | None = None
    ssim_threshold: float | None = None
    # the official code's hinge and λ·lr₀/lr(t) schedule: the default chosen by the frontier study
    # (docs/default_cem_loss.md); "gmm" + "constant" is the paper's bound with a fixed λ
    cem_mode: str = "reference"
    lambda_schedule: str = "inverse_lr"
    clusters_per_class: int | None = None  # None: 5 for VGG, 15 for ResNet (reference §4.2)
    kmeans_iterations: int = 50
    # optimisation (reference §5)
    epochs: int = 240
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875)  # fractions: 60/120/180/210 of 240
    lr_decay: float = 0.2
    # "multistep": ×lr_decay at lr_milestones (the reference); "onecycle": linear warm-up from 0 to lr
    # over warmup_fraction of the steps, then linear decay to 0 at the last step
    # (cem_jax.train.onecycle_schedule; under inverse_lr, λ scales by at most ×25 there)
    lr_schedule: str = "multistep"
    warmup_fraction: float = 0.2  # read by lr_schedule="onecycle" only
    nesterov: bool = False  # Nesterov momentum (PyTorch's form, optax.sgd(nesterov=True))
    label_smoothing: float = 0.0  # ε: cross-entropy against (1 − ε)·one_hot + ε/C
    augment_padding: int = 4  # random crop after zero padding by this many pixels (0: no crop)
    seed: int = 125
    eval_batch_size: int = 500
    # attacks (DESIGN §2 step 4): budgets in optimizer steps, stopped on a validation plateau
    attacks: tuple[str, ...] = ("decoder", "whitebox", "gan")
    attack_settings: tuple[str, ...] = ATTACK_SETTINGS
    attack_steps: int = 10_000  # max decoder steps (the reference's 50 epochs of 50k: ~9,800)
    attack_batch_size: int = 256
    attack_eval_every: int = 100  # validate every N steps (plateau rule: cem_jax.attacks)
    attack_patience: int = 3  # validations without a real gain before the lr decays / it stops
    attack_min_improvement: float = 0.005  # a "real gain": relative drop of the validation MSE
    attack_lr_decays: int = 2  # x0.2 learning-rate decays before a plateau stops the attack
    attack_val_fraction: float = 0.1  # of the attacker's images, held out for validation
    attack_train_subset: int | None = None
    gan_steps: int = 30_000  # max critic steps (one generator step per 10)
    gan_train_subset: int | None = None  # the GAN attack trains on the first N attacker images
    whitebox_steps: int = 3000  # max optimisation steps per image batch
    whitebox_images: int = 512  # evaluation images attacked (first N of each setting)
    whitebox_tv_weight: float = 2.0
    threat_model: str = "server_view"
    attack_seed: int = 200

    # ----------------------------------------------------------------------------------------------
    def defense_spec(self) -> defenses.Defense:
        """The :class:`cem_jax.defenses.Defense` this config asks for (preset + overrides)."""
        overrides = {k: getattr(self, k) for k in DEFENSE_OVERRIDES}
        return defenses.make_defense(self.defense, **overrides)

    @property
    def resolved_cut_layer(self) -> int:
        return default_cut_layer(self.arch) if self.cut_layer is None else self.cut_layer

    @property
    def resolved_clusters_per_class(self) -> int:
        if self.clusters_per_class is not None:
            return self.clusters_per_class
        return 5 if self.arch.startswith("vgg") else 15

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field and what is accepted."""
        _check_dataset(self.dataset)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("cem_mode", self.cem_mode, CEM_MODES)
        _check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("threat_model", self.threat_model, THREAT_MODELS)
        for a in self.attacks:
            _check_choice("attacks", a, ATTACKS)
        for s in self.attack_settings:
            _check_choice("attack_settings", s, ATTACK_SETTINGS)
        self.defense_spec()  # validates the defense name and its values
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eval_batch_size": self.eval_batch_size,
            "attack_batch_size": self.attack_batch_size,
            "kmeans_iterations": self.kmeans_iterations,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value!r}: accepted values are > 0.")
        for name in ("attack_steps", "gan_steps", "whitebox_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(
                    f"{name}={v!r}: an attack budget is a number of optimizer steps; accepted an "
                    "integer >= 1 (leave the attack out of --attacks instead)."
                )
        if not 0 <= self.attack_min_improvement < 1:
            raise ValueError(
                f"attack_min_improvement={self.attack_min_improvement}: accepted a fraction in [0, 1)."
            )
        if self.attack_lr_decays < 0:
            raise ValueError(f"attack_lr_decays={self.attack_lr_decays}: accepted an integer >= 0.")
        for name in ("attack_eval_every", "attack_patience", "whitebox_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: accepted an integer >= 1.")
        if not 0 < self.attack_val_fraction < 1:
            raise ValueError(
                f"attack_val_fraction={self.attack_val_fraction}: accepted a fraction in (0, 1) of "
                "the attacker's images."
            )
        if "gan" in self.attacks and self.gan_steps < 10:
            raise ValueError(
                f"gan_steps={self.gan_steps}: the GAN attack takes one generator step per 10 critic "
                "steps; accepted >= 10 (a GAN result without a generator step is the decoder's)."
            )
        if not (math.isfinite(self.whitebox_tv_weight) and self.whitebox_tv_weight >= 0):
            raise ValueError(
                f"whitebox_tv_weight={self.whitebox_tv_weight}: accepted a finite value >= 0."
            )
        if self.resolved_clusters_per_class < 1:
            raise ValueError(
                f"clusters_per_class={self.clusters_per_class}: accepted values are >= 1."
            )
        if self.bottleneck_channels < 0:
            raise ValueError(
                f"bottleneck_channels={self.bottleneck_channels}: accepted values are >= 0 (0: none)."
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}: accepted values are in [0, 1).")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay}: accepted values are >= 0.")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay={self.lr_decay}: accepted values are in (0, 1].")
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(
                f"lr_milestones={self.lr_milestones}: accepted values are fractions of the run in (0, 1)."
            )
        if not (isinstance(self.warmup_fraction, (int, float)) and 0 < self.warmup_fraction < 1):
            raise ValueError(
                f"warmup_fraction={self.warmup_fraction!r}: accepted a fraction of the run's steps in "
                "(0, 1) (the one-cycle schedule's linear warm-up from 0 to --lr)."
            )
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov={self.nesterov!r}: accepted True or False.")
        if not (
            isinstance(self.augment_padding, int)
            and not isinstance(self.augment_padding, bool)
            and 0 <= self.augment_padding <= 16
        ):
            raise ValueError(
                f"augment_padding={self.augment_padding!r}: accepted an int in [0, 16] (pixels of "
                "zero padding before the random crop; 0: flips only)."
            )
        if not (
            isinstance(self.label_smoothing, (int, float))
            and not isinstance(self.label_smoothing, bool)
            and 0 <= self.label_smoothing < 1
        ):
            raise ValueError(
                f"label_smoothing={self.label_smoothing!r}: accepted a value in [0, 1) (0: plain "
                "cross-entropy; the targets are (1 - eps) * one_hot + eps / num_classes)."
            )
        for name in ("train_subset", "test_subset", "attack_train_subset", "gan_train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: accepted values are >= 1 or unset.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint depends on: resuming with any of them changed is refused
        (:func:`fingerprint_diff`). Besides the config's training fields it holds
        :data:`RESOLVED_DEFENSE`, the defense the run trains with, which a changed preset changes.

        A field of :data:`ADDED_TRAINING_FIELDS` at its old value is left out (the fingerprint of a
        config that trains as before reads as before), and so are the fields that the config's
        learning-rate schedule does not read (:data:`SCHEDULE_FIELDS`: ``warmup_fraction`` under
        multistep, ``lr_milestones`` and ``lr_decay`` under onecycle)."""
        ignore = {
            "data_dir",
            "eval_batch_size",
            "attack_seed",
            "threat_model",
            "attack_train_subset",
        }
        ignore |= {f.name for f in dataclasses.fields(self) if f.name.startswith(ATTACK_PREFIXES)}
        ignore |= {k for k, old in ADDED_TRAINING_FIELDS.items() if getattr(self, k) == old}
        for schedule, fields in SCHEDULE_FIELDS.items():
            if schedule != self.lr_schedule:
                ignore |= set(fields)
        d = {k: v for k, v in self.to_dict().items() if k not in ignore}
        d[RESOLVED_DEFENSE] = dataclasses.asdict(self.defense_spec())
        return json.loads(json.dumps(d))  # tuples -> lists, as stored in JSON


def dict_diff(
    stored: dict[str, Any], wanted: dict[str, Any], skip: Any = ()
) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored, wanted)}`` for every key (outside ``skip``) where two dicts differ, a missing
    key read as ``None``; sorted by key.

    >>> dict_diff({"a": 1, "b": 2}, {"a": 1, "c": 3})
    {'b': (2, None), 'c': (None, 3)}
    """
    keys = sorted(k for k in set(stored) | set(wanted) if k not in skip)
    return {k: (stored.get(k), wanted.get(k)) for k in keys if stored.get(k) != wanted.get(k)}


def fingerprint_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Where two training fingerprints (:meth:`RunConfig.training_fingerprint`) differ:
    ``{field: (stored, wanted)}``, empty when they describe the same training.

    When both hold :data:`RESOLVED_DEFENSE`, the defense is compared field by field through it
    (``"resolved_defense.lambd"``) instead of the config's override fields
    (:data:`DEFENSE_OVERRIDES`): ``lambd=None`` under a preset of λ 0.32 trains the same run as
    ``lambd=0.32``, and a preset whose λ changed does not, although both configs read ``None``. A
    fingerprint written before the resolved defense was recorded lacks it and is compared on its
    config fields alone.

    >>> a = RunConfig(defense="cem_noise").training_fingerprint()
    >>> fingerprint_diff(a, RunConfig(defense="cem_noise", lambd=0.32).training_fingerprint())
    {}
    >>> fingerprint_diff(a, RunConfig(defense="cem_noise", lambd=3.0).training_fingerprint())
    {'resolved_defense.lambd': (0.32, 3.0)}
    """
    both = RESOLVED_DEFENSE in stored and RESOLVED_DEFENSE in wanted
    skip = {RESOLVED_DEFENSE, *(DEFENSE_OVERRIDES if both else ())}
    diff = dict_diff(stored, wanted, skip)
    if both:
        inner = dict_diff(stored[RESOLVED_DEFENSE] or {}, wanted[RESOLVED_DEFENSE] or {})
        diff.update({f"{RESOLVED_DEFENSE}.{k}": v for k, v in inner.items()})
    return diff


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict` (JSON lists back to tuples; unknown keys rejected)."""
    names = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config fields {unknown}: this run was written by another version."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return RunConfig(**kwargs)


# Presets: "paper" is the reference schedule (240 epochs on the full training set); "quick" is a short
# schedule on a subset that runs end to end (train + attacks) in a few minutes on a 2-core laptop;
# "cifar_full" trains on the full training set in a 15-epoch one-cycle schedule (about 2 h on one).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "epochs": 6,
        "train_subset": 5000,
        "test_subset": 2000,
        "lr_milestones": (0.5, 0.75),
        "kmeans_iterations": 20,
        # Attacks trained to a validation plateau within a budget that fits a 2-core CPU: the decoder
        # alone. The GAN is left out (its converged budget is hours on a CPU: --attacks=decoder,gan);
        # so is the white-box attack, which ended UNINFORMATIVE on every quick client measured (0.48
        # and 1.19 dB under the mean image on cem_noise) and cost 1:43 of a 23:40 run
        # (--attacks=decoder,whitebox runs it; docs/privacy_evaluation.md).
        "attacks": ("decoder",),
        "attack_train_subset": 4000,
        "attack_batch_size": 64,
        "attack_steps": 3000,
        "attack_eval_every": 100,
        "attack_patience": 2,
        "attack_min_improvement": 0.01,
        "attack_lr_decays": 1,
        "whitebox_steps": 1500,
        "whitebox_images": 64,
    },
    # "cifar_full" (issue 36): the paper's split (VGG11-BN, cut 4, bottleneck 8) on all the training
    # images (CIFAR-10: 50,000; all 10,000 test images for accuracy) in a short one-cycle schedule,
    # made to reach >= 85 % clean test accuracy undefended, on a 2-core CPU (~150 img/s train step).
    # The recipe follows airbench's (94 % in ~10 epochs) where it applies to an unchanged VGG11-BN: a
    # triangular schedule (linear warm-up to the peak, linear decay to 0), label smoothing, Nesterov
    # momentum, a larger batch with a linearly larger rate (0.05 at 128 -> 0.1 at 256, x2 for a
    # one-cycle peak), a 2-pixel translation. Not taken: airbench's whitening first layer, its widths
    # and GELUs (architecture), lookahead/EMA of the weights (training state), alternating flips,
    # flip/translate test-time augmentation (the accuracy stays the plain per-image one a server
    # computes), batch 1024 (CEM's batch statistics want a batch <= 512).
    # Measured on the 2-core CPU, none, seed 1, ~5.5 min per epoch (145-157 img/s), clean test
    # accuracy after the last epoch:
    #   10 epochs, crop padding 4: 0.822 (train loss 0.91 with smoothed targets: under-fitted);
    #   12 epochs, crop padding 2: 0.844 (0.796 at 10, 0.812 at 11; train loss 0.80);
    #   15 epochs, crop padding 2: 0.853 (0.799 at 12, 0.838 at 14; train loss 0.73): this preset.
    # The 90-min budget per run is not kept at 15 epochs: ~91 min of training (6.1 min per epoch
    # with the test evaluation) plus the train-time decoder attack under the paper preset's stopping
    # rule (patience 3, 0.5 %, two decays; 2,600 steps in 16:00 at the 10-epoch client, 3,700 steps
    # in ~30 min at the study's run 1, before the decoder step got ~1.15x faster at batch 64) is
    # ~2 h; the accuracy target comes first.
    # train_time alone is what the results page reads (the study's choice); both settings (this
    # preset's default, what a user gets) add ~15 min.
    "cifar_full": {
        # -- the numbers to tune (measure them: accuracy after `epochs`, minutes per epoch) --
        "epochs": 15,
        "batch_size": 256,
        "augment_padding": 2,  # airbench's 2-pixel translation; 4 (the reference's) under-fits here
        "lr": 0.2,  # the one-cycle's peak
        "warmup_fraction": 0.2,  # airbench peaks at 23 % of the run
        "label_smoothing": 0.1,  # airbench 0.2; 0.1 is the common choice and moves features less
        # quick's 64, not the paper's 256: the step is compute-bound (~170 decoder images/s on the
        # 2-core CPU at either batch), so 256 costs 4x per step and the paper's rule still takes
        # ~2,000+ steps: 50+ min per setting, over the 90-min budget; at 64 it is ~15-20 min.
        "attack_batch_size": 64,
        "attack_train_subset": 10_000,
        # -- the recipe --
        "lr_schedule": "onecycle",
        "nesterov": True,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "kmeans_iterations": 20,
        # Attacks: the decoder alone (white-box and GAN are hours at this scale on a CPU), trained to
        # the paper preset's plateau. Its train-time attacker trains on 10,000 training images (9,000
        # + 1,000 held out), about as many as the inference-time attacker's 9,000 test images (8,100 +
        # 900), so the two settings attack with the same amount of data; more images strengthen the
        # attacker a little and lengthen its run (its plateau comes later).
        "attacks": ("decoder",),
        "attack_settings": ATTACK_SETTINGS,
        "attack_steps": 10_000,
        "attack_eval_every": 100,
        "attack_patience": 3,
        "attack_min_improvement": 0.005,
        "attack_lr_decays": 2,
    },
}


def make_config(preset: str = "paper", **overrides: Any) -> RunConfig:
    """A validated :class:`RunConfig`: the preset's values, then every non-``None`` override."""
    _check_choice("preset", preset, tuple(PRESETS))
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; accepted: {sorted(names)}.")
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


def _check_dataset(value: Any) -> None:
    """One of :data:`DATASETS`, or ``tfds:NAME`` with a NAME (checked when the data are read)."""
    if isinstance(value, str) and value.startswith(TFDS_PREFIX):
        if not value[len(TFDS_PREFIX) :].strip():
            raise ValueError(
                f"dataset {value!r}: name a TFDS dataset after {TFDS_PREFIX!r}, e.g. "
                f"{TFDS_PREFIX}mnist."
            )
        return
    _check_choice("dataset", value, (*DATASETS, f"{TFDS_PREFIX}NAME"))


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        close = difflib.get_close_matches(str(value), accepted, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}.{hint}")
