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
from typing import Any

from cem_jax import defenses
from cem_jax.models import ARCHS, default_cut_layer

DATASETS = ("cifar10", "cifar100", "facescrub", "tinyimagenet", "synthetic")
CEM_MODES = ("gmm", "reference")
ATTACKS = ("decoder", "gan")
ATTACK_SETTINGS = ("train_time", "inference_time")
THREAT_MODELS = ("server_view", "noise_only")


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
    cem_mode: str = "gmm"
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
    seed: int = 125
    eval_batch_size: int = 500
    # attacks (DESIGN §2 step 4)
    attacks: tuple[str, ...] = ("decoder", "gan")
    attack_settings: tuple[str, ...] = ATTACK_SETTINGS
    attack_epochs: int = 50
    attack_batch_size: int = 256
    attack_train_subset: int | None = None
    gan_epochs: int = 150
    gan_train_subset: int | None = None  # the GAN attack trains on the first N attacker images
    threat_model: str = "server_view"
    attack_seed: int = 200

    # ----------------------------------------------------------------------------------------------
    def defense_spec(self) -> defenses.Defense:
        """The :class:`cem_jax.defenses.Defense` this config asks for (preset + overrides)."""
        overrides = {
            "sigma": self.sigma,
            "lambd": self.lambd,
            "dropout_ratio": self.dropout_ratio,
            "dropout_rescale": self.dropout_rescale,
            "topk_ratio": self.topk_ratio,
            "topk_scope": self.topk_scope,
            "nopeek_alpha": self.nopeek_alpha,
            "adversarial_alpha": self.adversarial_alpha,
            "ssim_threshold": self.ssim_threshold,
        }
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
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("cem_mode", self.cem_mode, CEM_MODES)
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
        for name in ("attack_epochs", "gan_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: accepted values are >= 0.")
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
        for name in ("train_subset", "test_subset", "attack_train_subset", "gan_train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: accepted values are >= 1 or unset.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint depends on: resuming with any of them changed is refused."""
        ignore = {
            "data_dir",
            "eval_batch_size",
            "attack_seed",
            "threat_model",
            "attack_train_subset",
        }
        ignore |= {f.name for f in dataclasses.fields(self) if f.name.startswith(("attack", "gan"))}
        d = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return json.loads(json.dumps(d))  # tuples -> lists, as stored in JSON


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
# schedule on a subset that runs end to end (train + attacks) in a few minutes on a 2-core laptop.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "epochs": 6,
        "train_subset": 5000,
        "test_subset": 2000,
        "lr_milestones": (0.5, 0.75),
        "kmeans_iterations": 20,
        "attack_epochs": 3,
        "attack_train_subset": 4000,
        "gan_epochs": 1,
        "gan_train_subset": 1280,  # 10 critic steps, 1 generator step
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


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        close = difflib.get_close_matches(str(value), accepted, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}.{hint}")
