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
