"""Tests of cem_jax/config.py: the training fingerprint and how two of them are compared."""

from __future__ import annotations

import pytest

from cem_jax import config as config_lib
from cem_jax import defenses

RD = config_lib.RESOLVED_DEFENSE


def _fp(**kw):
    return config_lib.RunConfig(**kw).training_fingerprint()


def test_fingerprint_holds_the_resolved_defense():
    fp = _fp(defense="cem_topk", sigma=0.2)
    assert fp["lambd"] is None  # the config's own field: "the preset's"
    assert fp[RD]["lambd"] == defenses.DEFAULT_LAMBDA and fp[RD]["cem"] is True
    assert (
        fp[RD]["sigma"] == 0.2 and fp[RD]["topk_ratio"] == defenses.DEFENSES["topk"]["topk_ratio"]
    )
    assert fp[RD]["name"] == "cem_topk"


def test_fingerprint_diff_compares_the_defense_a_run_trains_with(monkeypatch):
    before = _fp(defense="cem_noise")
    # spelled differently, trained the same: no difference
    assert (
        config_lib.fingerprint_diff(before, _fp(defense="cem_noise", lambd=defenses.DEFAULT_LAMBDA))
        == {}
    )
    assert config_lib.fingerprint_diff(before, _fp(defense="cem_noise", sigma=0.1)) == {}
    # other fields still count, alone
    assert config_lib.fingerprint_diff(before, _fp(defense="cem_noise", epochs=7)) == {
        "epochs": (before["epochs"], 7)
    }
    # the preset changes (the default λ of the cem_* presets): the config reads the same, the run
    # does not, and the difference is named
    monkeypatch.setitem(
        defenses.DEFENSES, "cem_noise", {**defenses.DEFENSES["cem_noise"], "lambd": 3.0}
    )
    after = _fp(defense="cem_noise")
    assert {k: v for k, v in after.items() if k != RD} == {
        k: v for k, v in before.items() if k != RD
    }
    assert config_lib.fingerprint_diff(before, after) == {
        "resolved_defense.lambd": (defenses.DEFAULT_LAMBDA, 3.0)
    }
    # a fingerprint recorded before it held the resolved defense: compared on the config alone
    old = {k: v for k, v in before.items() if k != RD}
    assert config_lib.fingerprint_diff(old, after) == {}
    assert config_lib.fingerprint_diff(old, _fp(defense="cem_noise", lambd=2.0)) == {
        "lambd": (None, 2.0)
    }


def test_a_checkpoint_from_before_a_preset_change_is_refused(monkeypatch):
    from cem_jax import train

    cfg = config_lib.RunConfig(defense="cem_noise")
    meta = {"format_version": train.FORMAT_VERSION, "fingerprint": cfg.training_fingerprint()}
    train.check_compatible(meta, cfg, "ckpt")  # the same run: accepted
    monkeypatch.setitem(
        defenses.DEFENSES, "cem_noise", {**defenses.DEFENSES["cem_noise"], "lambd": 3.0}
    )
    with pytest.raises(
        train.IncompatibleCheckpointError,
        match=rf"resolved_defense\.lambd: checkpoint {defenses.DEFAULT_LAMBDA} vs requested 3\.0",
    ):
        train.check_compatible(meta, cfg, "ckpt")


# ------------------------------------------------------------------- schedule and loss fields (issue 36)
NEW_FIELDS = (*config_lib.ADDED_TRAINING_FIELDS, "warmup_fraction")


def _old_fingerprint(cfg):
    """The fingerprint as it was built before the schedule and loss fields existed."""
    import dataclasses
    import json

    ignore = {"data_dir", "eval_batch_size", "attack_seed", "threat_model", "attack_train_subset"}
    d = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ignore and not k.startswith(config_lib.ATTACK_PREFIXES) and k not in NEW_FIELDS
    }
    d[RD] = dataclasses.asdict(cfg.defense_spec())
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("preset", ["paper", "quick"])
@pytest.mark.parametrize("defense", ["none", "noise", "cem_noise", "cem_topk"])
def test_existing_presets_keep_their_fingerprint(preset, defense):
    cfg = config_lib.make_config(preset, defense=defense)
    assert (cfg.lr_schedule, cfg.nesterov, cfg.label_smoothing) == ("multistep", False, 0.0)
    fp = cfg.training_fingerprint()
    assert not set(NEW_FIELDS) & set(fp)  # the new fields at their old values are left out
    assert fp == _old_fingerprint(cfg)


def test_a_recorded_run_still_matches_its_config():
    """A run recorded before the new fields (docs/results_runs.jsonl) is the same run today."""
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "results_runs.jsonl")) as f:
        rec = json.loads(f.readline())
    assert not set(NEW_FIELDS) & set(rec["config"])  # written before them
    cfg = config_lib.config_from_dict(rec["config"])
    assert config_lib.fingerprint_diff(rec["fingerprint"], cfg.training_fingerprint()) == {}


def test_new_fields_away_from_their_old_values_enter_the_fingerprint():
    base = _fp()
    assert config_lib.fingerprint_diff(base, _fp(nesterov=True)) == {"nesterov": (None, True)}
    assert config_lib.fingerprint_diff(base, _fp(label_smoothing=0.1)) == {
        "label_smoothing": (None, 0.1)
    }
    assert config_lib.fingerprint_diff(base, _fp(augment_padding=2)) == {
        "augment_padding": (None, 2)
    }
    # onecycle reads warmup_fraction and not the milestones: the fingerprint holds what it reads
    one = _fp(lr_schedule="onecycle")
    assert one["lr_schedule"] == "onecycle" and one["warmup_fraction"] == 0.2
    assert "lr_milestones" not in one and "lr_decay" not in one
    assert _fp(lr_schedule="onecycle", lr_milestones=(0.5,)) == one
    assert config_lib.fingerprint_diff(one, _fp(lr_schedule="onecycle", warmup_fraction=0.3)) == {
        "warmup_fraction": (0.2, 0.3)
    }
    # ... and multistep does not read warmup_fraction
    assert "warmup_fraction" not in _fp(warmup_fraction=0.3)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr_schedule", "cosine", "unknown lr_schedule 'cosine'; accepted: multistep, onecycle"),
        ("lr_schedule", "one_cycle", "Did you mean 'onecycle'"),
        ("label_smoothing", 1.0, r"label_smoothing=1\.0: accepted a value in \[0, 1\)"),
        ("label_smoothing", -0.1, r"label_smoothing=-0\.1"),
        ("label_smoothing", True, r"label_smoothing=True"),
        ("warmup_fraction", 0.0, r"warmup_fraction=0\.0: accepted a fraction .* in \(0, 1\)"),
        ("warmup_fraction", 1.0, r"warmup_fraction=1\.0"),
        ("nesterov", "yes", r"nesterov='yes': accepted True or False"),
        ("augment_padding", -1, r"augment_padding=-1: accepted an int in \[0, 16\]"),
        ("augment_padding", 2.0, r"augment_padding=2\.0"),
        ("augment_padding", True, r"augment_padding=True"),
    ],
)
def test_schedule_and_loss_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.make_config("quick", **{field: value})


def test_cifar_full_preset_is_the_papers_split_on_all_the_data():
    cfg = config_lib.make_config("cifar_full", defense="cem_noise")
    paper = config_lib.make_config("paper")
    # the paper's split and data: VGG11-BN, cut 4, bottleneck 8, every training and test image
    assert (cfg.arch, cfg.resolved_cut_layer, cfg.bottleneck_channels) == ("vgg11_bn_sgm", 4, 8)
    assert cfg.train_subset is None and cfg.test_subset is None
    # the short schedule
    assert cfg.lr_schedule == "onecycle" and cfg.nesterov and 0 < cfg.label_smoothing < 1
    assert cfg.epochs <= 16 and cfg.batch_size <= 512 and cfg.augment_padding == 2
    # the decoder attack alone, under the paper preset's stopping rule
    assert cfg.attacks == ("decoder",)
    assert set(cfg.attack_settings) == {"train_time", "inference_time"}
    for name in (
        "attack_steps",
        "attack_eval_every",
        "attack_patience",
        "attack_min_improvement",
        "attack_lr_decays",
    ):
        assert getattr(cfg, name) == getattr(paper, name), name
    assert cfg.attack_train_subset == 10_000
    # quick's attack batch, not the paper's 256: at 256 the paper's rule runs past the 90-min budget
    assert cfg.attack_batch_size == 64 < paper.attack_batch_size
    # the default CEM loss and λ schedule, as the other presets
    assert (cfg.cem_mode, cfg.lambda_schedule) == (paper.cem_mode, paper.lambda_schedule)
