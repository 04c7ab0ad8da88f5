"""The flags of cem-run / cem-sweep / cem-attack are generated from RunConfig's fields (one definition)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing

import pytest
from absl import flags

from cem_jax import config as config_lib
from cem_jax.cli import attack as attack_cli
from cem_jax.cli import config_flags
from cem_jax.cli import run as run_cli
from cem_jax.cli import sweep as sweep_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {f.name: f for f in dataclasses.fields(config_lib.RunConfig)}


def _fresh(define) -> flags.FlagValues:
    fv = flags.FlagValues()
    define(fv)
    return fv


def _parse(define, *args: str) -> flags.FlagValues:
    fv = _fresh(define)
    fv(["prog", *args])
    return fv


def _expected_parser(name: str) -> type:
    base, _ = config_flags.flag_kind(name)
    if typing.get_origin(base) is tuple:
        return config_flags.TupleParser
    if base is str and name in config_flags.CHOICES:
        return flags.EnumParser
    return {
        bool: flags.BooleanParser,
        int: flags.IntegerParser,
        float: flags.FloatParser,
        str: flags.ArgumentParser,
    }[base]


def test_every_config_field_has_a_run_flag_of_its_type_and_default():
    fv = _fresh(run_cli.define_flags)
    for name, field in FIELDS.items():
        assert name in fv, f"RunConfig.{name} has no flag"
        assert type(fv[name].parser) is _expected_parser(name), name
        default = None if field.default is dataclasses.MISSING else field.default
        assert fv[name].default == default, name


def test_every_config_field_has_help_from_one_place():
    missing = [n for n in FIELDS if not config_flags.help_of(n)]
    assert not missing, f"RunConfig fields without help (metadata['help'] or HELP): {missing}"
    stale = sorted(set(config_flags.HELP) - set(FIELDS))
    assert not stale, f"HELP entries of fields RunConfig no longer has: {stale}"
    assert set(config_flags.CHOICES) <= set(FIELDS)


def test_unset_flags_keep_the_preset_and_set_flags_override(monkeypatch):
    monkeypatch.delenv("CEM_DATA_DIR", raising=False)
    fv = _parse(run_cli.define_flags, "--preset=quick")
    assert run_cli.config_from_flags(fv) == config_lib.make_config("quick")
    fv = _parse(
        run_cli.define_flags,
        "--preset=quick",
        "--epochs=240",  # explicitly the dataclass default: still overrides the preset's 6
        "--lr_milestones=0.3,0.6",
        "--attacks=",
        "--dropout_rescale",
        "--defense=cem_dropout",
        "--cem_mode=gmm",  # the default is the official hinge, "reference"
    )
    cfg = run_cli.config_from_flags(fv)
    assert cfg.epochs == 240 and cfg.lr_milestones == (0.3, 0.6) and cfg.attacks == ()
    assert cfg.dropout_rescale is True and cfg.cem_mode == "gmm"
    assert cfg.train_subset == config_lib.PRESETS["quick"]["train_subset"]


def test_cem_data_dir_is_the_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CEM_DATA_DIR", str(tmp_path))
    assert run_cli.config_from_flags(_parse(run_cli.define_flags)).data_dir == str(tmp_path)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--lr_milestones=0.5,abc", "'abc' is not a number"),
        ("--lr_milestones=0.5,nan", "'nan' is not a number"),
        ("--epochs=six", "--epochs=six: invalid literal"),
        ("--cem_mode=hinge", "should be one of <gmm|reference>"),
    ],
)
def test_bad_flag_values_are_named(arg, message):
    fv = _fresh(run_cli.define_flags)
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        fv(["prog", arg])


def test_attack_flags_are_the_fields_a_reattack_may_change():
    fv = _fresh(attack_cli.define_flags)
    trained = set(config_lib.RunConfig().training_fingerprint())
    config_names = [n for n in FIELDS if n in fv]
    assert config_names == [n for n in FIELDS if n not in trained]
    assert "attacks" in fv and "threat_model" in fv and "data_dir" in fv
    assert "epochs" not in fv and "sigma" not in fv and "defense" not in fv
    # unset means "the run's value": every config flag defaults to None and overrides nothing
    assert all(fv[n].default is None for n in config_names)
    fv(["prog", "--workdir=w", "--attacks=decoder", "--attack_seed=7"])
    assert config_flags.config_overrides(fv, config_names) == {
        "attacks": ("decoder",),
        "attack_seed": 7,
    }


def test_sweep_flags_sweep_the_axes_and_pass_every_other_field():
    fv = _fresh(sweep_cli.define_flags)
    for axis in sweep_cli.AXES:
        assert axis not in fv, axis
    assert all(n in fv for n in FIELDS if n not in sweep_cli.AXES)
    fv(["prog", "--sigmas=0.05,0.1", "--seeds=1,2", "--lambdas=", "--epochs=3"])
    assert fv.sigmas == (0.05, 0.1) and fv.seeds == (1, 2) and fv.lambdas == ()
    assert config_flags.config_overrides(fv, [n for n in FIELDS if n in fv]) == {"epochs": 3}


def test_help_of_each_program_lists_its_flags_and_the_defense_presets():
    for module, expected in (
        ("experiments.run", ["--defense", "--lr_milestones", "--workdir", "--preset"]),
        ("experiments.sweep", ["--seeds", "--sigmas", "--collect_only", "--epochs"]),
        ("experiments.attack", ["--workdir", "--attacks", "--threat_model"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]  # absl's --help exits 1
        for flag in expected:
            name = flag.removeprefix("--")
            assert f"--{name}:" in proc.stdout or f"--[no]{name}:" in proc.stdout, (module, flag)
    run_help = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--helpfull"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    ).stdout
    flat = " ".join(run_help.split())
    from cem_jax import defenses

    for preset, values in defenses.DEFENSES.items():
        assert preset in flat
        for k, v in values.items():
            assert (k if v is True else f"{k}={v}") in flat, (preset, k)
    assert "[preset quick: 6; cifar_full: 15]" in flat  # --epochs: what each preset changes


def test_flag_kinds_follow_the_type_annotations():
    assert config_flags.flag_kind("sigma") == (float, True)
    assert config_flags.flag_kind("epochs") == (int, False)
    assert config_flags.flag_kind("attacks") == (tuple[str, ...], False)
