"""load_client / restore_state on the workdir of every defense preset (the saved state's exact shape)."""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np
import pytest

from cem_jax import client, config, defenses, runner, train
from cem_jax import data as data_lib
from cem_jax.checkpoint import Checkpointer


def _finished_workdir(tmp_path, defense: str) -> tuple[str, train.Trainer, train.TrainState]:
    """A workdir holding what train.train saves after the last epoch (without the training)."""
    cfg = config.make_config(
        "paper",
        defense=defense,
        dataset="synthetic",
        epochs=1,
        batch_size=32,
        train_subset=64,
        test_subset=32,
        attacks=(),
    )
    ds = runner.load_data(cfg)
    trainer = train.Trainer(cfg, ds)
    state = trainer.init_state()
    # weights that differ from a fresh initialisation, so a restore that silently returned the
    # template would be caught
    state = state.replace(params=jax.tree.map(lambda p: p * 1.5 + 0.01, state.params))
    if state.adv is not None:
        state = state.replace(
            adv={**state.adv, "params": jax.tree.map(lambda p: p - 0.02, state.adv["params"])}
        )
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    history = [{"epoch": 1, "loss": 1.0}]
    ckpt.save(
        1, state, train.checkpoint_meta(cfg, trainer, 1, history, data_lib.dataset_identity(ds))
    )
    ckpt.close()
    return str(tmp_path), trainer, state


# the adversarial presets (whose saved state holds the local decoder) always run; the rest are slow
PRESETS = [
    d if "adversarial" in d else pytest.param(d, marks=pytest.mark.slow) for d in defenses.DEFENSES
]


@pytest.mark.parametrize("defense", PRESETS)
def test_load_client_on_every_presets_workdir(tmp_path, defense):
    workdir, trainer, state = _finished_workdir(tmp_path, defense)
    cfg, meta, ckpt = client.read_run(workdir)
    _, restored = client.restore_state(cfg, meta, ckpt, workdir)
    ckpt.close()
    # every entry training saved comes back, the adversarial defense's local decoder included
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if trainer.defense.adversarial_alpha > 0:
        assert restored.adv is not None

    c = client.load_client(workdir)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    z = c(x, jax.random.key(0))
    assert z.shape == (4, *trainer.feature_shape)
    expected = trainer.model(state).encode(data_lib.normalize(x, trainer.mean, trainer.std))
    np.testing.assert_allclose(
        np.asarray(c.encode_clean(x)), np.asarray(expected), rtol=1e-5, atol=1e-6
    )


def test_load_client_refuses_a_fallback_to_an_unfinished_epoch(tmp_path):
    workdir, trainer, state = _finished_workdir(tmp_path, "noise")
    cfg = trainer.cfg
    # an earlier, unfinished epoch 1 of a 2-epoch run, then a finished epoch 2 whose arrays are gone
    cfg2 = dataclasses.replace(cfg, epochs=2)
    ckpt_dir = tmp_path / "two"
    ckpt = Checkpointer(str(ckpt_dir / "checkpoints"))
    ident = data_lib.dataset_identity(trainer.dataset)
    ckpt.save(1, state, train.checkpoint_meta(cfg2, trainer, 1, [{"epoch": 1}], ident))
    ckpt.save(
        2, state, train.checkpoint_meta(cfg2, trainer, 2, [{"epoch": 1}, {"epoch": 2}], ident)
    )
    ckpt.close()
    for f in glob.glob(f"{ckpt_dir}/checkpoints/2/state/**/d/*", recursive=True):
        if os.path.isfile(f):
            os.truncate(f, 10)
    with pytest.raises(
        client.RunNotFoundError, match=r"not finished .*Checkpoint 2 was skipped: .*truncated"
    ):
        client.load_client(str(ckpt_dir))
