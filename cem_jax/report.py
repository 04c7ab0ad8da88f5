"""Attacks a trained client the way the paper does and writes what a researcher reads.

:func:`run_attacks` runs the decoder attack (and the GAN refinement) in both settings (train-time,
inference-time) against the client as the server sees it, and saves ``reconstructions.png``: for each
setting, a row of test originals above one row of reconstructions per attack.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import jax
import numpy as np
from PIL import Image

from cem_jax import attacks
from cem_jax.config import RunConfig
from cem_jax.progress import format_duration

FIGURE_FILE = "reconstructions.png"
_TAG_ATTACK = 7


def run_attacks(
    cfg: RunConfig,
    trainer: Any,
    state: Any,
    *,
    workdir: str | None = None,
    stream: TextIO | None = None,
    num_examples: int = 8,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{attack: {setting: {"mse", "psnr", "ssim", ..., "wall_time_s"}}}`` for ``cfg.attacks``."""
    out = stream if stream is not None else sys.stdout
    ds = trainer.dataset
    encode = trainer.client_fn(state, noise_only=cfg.threat_model == "noise_only")
    train_images = ds.train_images
    if cfg.attack_train_subset is not None and cfg.attack_train_subset < len(train_images):
        rng = np.random.default_rng(cfg.attack_seed)
        train_images = train_images[
            np.sort(rng.permutation(len(train_images))[: cfg.attack_train_subset])
        ]
    settings = attacks.split_settings(train_images, ds.test_images)
    base_key = jax.random.fold_in(jax.random.key(cfg.attack_seed), _TAG_ATTACK)
    results: dict[str, dict[str, dict[str, float]]] = {a: {} for a in cfg.attacks}
    rows: list[np.ndarray] = []
    devices = trainer.mesh.shape["data"]

    def batch_for(n: int, wanted: int) -> int:
        bs = min(wanted, n)
        return max(devices, bs // devices * devices)

    def progress(d: dict) -> None:
        extra = f" critic {d['critic_loss']:.3f}" if "critic_loss" in d else ""
        loss = f"{d['loss']:.5f}" if d["loss"] == d["loss"] else "- (no generator step yet)"
        print(
            f"  {d['attack']} [{setting}] epoch {d['epoch']}/{d['epochs']}: loss {loss}{extra}"
            f" | {d.get('steps_per_s', 0):.2f} steps/s",
            file=out,
            flush=True,
        )

    for s_index, setting in enumerate(cfg.attack_settings):
        train_x, eval_x = settings[setting]
        key = jax.random.fold_in(base_key, s_index)
        print(
            f"attack [{setting}]: attacker trains on {len(train_x)} images, evaluated on {len(eval_x)}",
            file=out,
            flush=True,
        )
        rows.append(eval_x[:num_examples].astype(np.float32) / 255.0)
        dec_cfg = attacks.DecoderAttackConfig(
            epochs=cfg.attack_epochs,
            batch_size=batch_for(len(train_x), cfg.attack_batch_size),
            eval_batch_size=batch_for(len(eval_x), cfg.attack_batch_size),
        )
        dec = attacks.decoder_attack(
            encode,
            train_x,
            eval_x,
            config=dec_cfg,
            key=jax.random.fold_in(key, 0),
            feature_shape=trainer.feature_shape,
            mesh=trainer.mesh,
            progress=progress,
        )
        if "decoder" in results:
            results["decoder"][setting] = {**dec.metrics, "wall_time_s": dec.wall_time_s}
            rows.append(np.asarray(dec.examples[:num_examples]))
        if "gan" in results and cfg.gan_epochs > 0:
            gan_x = train_x if cfg.gan_train_subset is None else train_x[: cfg.gan_train_subset]
            gan_cfg = attacks.GanAttackConfig(
                epochs=cfg.gan_epochs, batch_size=batch_for(len(gan_x), 128)
            )
            gan = attacks.gan_attack(
                encode,
                gan_x,
                eval_x,
                config=gan_cfg,
                key=jax.random.fold_in(key, 1),
                init_decoder=dec.decoder,
                mesh=trainer.mesh,
                progress=progress,
            )
            results["gan"][setting] = {
                **gan.metrics,
                "wall_time_s": gan.wall_time_s + dec.wall_time_s,
            }
            rows.append(np.asarray(gan.examples[:num_examples]))
        for name in results:
            if setting in results[name]:
                m = results[name][setting]
                print(
                    f"  {name} [{setting}]: MSE {m['mse']:.4f} PSNR {m['psnr']:.2f} dB SSIM "
                    f"{m['ssim']:.4f} ({format_duration(m['wall_time_s'])})",
                    file=out,
                    flush=True,
                )
    if workdir is not None and rows:
        save_grid(rows, os.path.join(workdir, FIGURE_FILE))
    return results


def save_grid(rows: list[np.ndarray], path: str, *, scale: int = 3, gap: int = 2) -> None:
    """Saves rows of ``[n, H, W, 3]`` images in [0, 1] as one PNG (rows top to bottom)."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.ones(((h + gap) * len(rows) - gap, (w + gap) * n - gap, 3), np.float32)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = np.clip(
                img, 0, 1
            )
    pil = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    pil.save(tmp)
    os.replace(tmp, path)
