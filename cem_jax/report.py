"""Attacks a trained client the way the paper does and writes what a researcher reads.

:func:`run_attacks` runs the decoder attack (and the GAN refinement) in both settings (train-time,
inference-time) against the client as the server sees it, and saves ``reconstructions.png``: for each
setting, a row of test originals above one row of reconstructions per attack.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any, TextIO

import jax
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from cem_jax import attacks, parallel, storage
from cem_jax.config import RunConfig
from cem_jax.progress import format_duration

FIGURE_FILE = "reconstructions.png"
ATTACK_CHECKPOINT_SUBDIR = "attack_checkpoints"
_TAG_ATTACK = 7


#: An attack is informative only when its MSE is at most this fraction of the mean-image baseline's
#: (0.9: at least 0.46 dB better); otherwise it has learned nothing usable about the features.
INFORMATIVE_MSE_RATIO = 0.9


def attacker_sets(cfg: RunConfig, ds: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``setting -> (attacker's images, evaluation images)`` for ``cfg.attack_settings``."""
    train_images = ds.train_images
    if cfg.attack_train_subset is not None and cfg.attack_train_subset < len(train_images):
        rng = np.random.default_rng(cfg.attack_seed)
        train_images = train_images[
            np.sort(rng.permutation(len(train_images))[: cfg.attack_train_subset])
        ]
    settings = attacks.split_settings(train_images, ds.test_images)
    return {s: settings[s] for s in cfg.attack_settings}


def _batch_for(wanted: int, devices: int) -> int:
    """``wanted`` rounded down to a multiple of ``devices`` (at least one row per device). Not
    shrunk to a small evaluation set (the last batch is padded and masked): every setting's
    attack then has the same shapes and reuses the first one's compiled steps."""
    return max(devices, wanted // devices * devices)


def attack_configs(cfg: RunConfig, n_train: int, devices: int = 1) -> dict[str, Any]:
    """The attack configs of one setting (``"decoder"``, ``"gan"``, ``"whitebox"``).

    Raises ``ValueError`` (before anything trains) when the attacker's set cannot hold a
    validation split and one batch.
    """
    n_gan = 0
    batch = _batch_for(cfg.attack_batch_size, devices)
    eval_batch = _batch_for(256, devices)
    out: dict[str, Any] = {
        "decoder": attacks.DecoderAttackConfig(
            max_steps=cfg.attack_steps,
            batch_size=batch,
            eval_batch_size=eval_batch,
            val_fraction=cfg.attack_val_fraction,
            eval_every=min(cfg.attack_eval_every, cfg.attack_steps),
            patience=cfg.attack_patience,
            min_improvement=cfg.attack_min_improvement,
            lr_decays=cfg.attack_lr_decays,
        ),
        "whitebox": attacks.WhiteboxAttackConfig(
            max_steps=cfg.whitebox_steps,
            num_images=cfg.whitebox_images,
            tv_weight=cfg.whitebox_tv_weight,
            eval_every=min(50, cfg.whitebox_steps),
        ),
    }
    if "gan" in cfg.attacks:
        n_gan = n_train if cfg.gan_train_subset is None else min(n_train, cfg.gan_train_subset)
        out["gan"] = attacks.GanAttackConfig(
            max_steps=cfg.gan_steps,
            batch_size=_batch_for(min(128, batch), devices),
            eval_batch_size=eval_batch,
            val_fraction=cfg.attack_val_fraction,
            eval_every=max(10, min(cfg.attack_eval_every * 2, cfg.gan_steps)),
            patience=cfg.attack_patience,
            min_improvement=cfg.attack_min_improvement,
            lr_decays=min(cfg.attack_lr_decays, 1),
        )
    sizes = {"decoder": n_train, "gan": n_gan if "gan" in out else 0}
    for name in ("decoder", "gan"):
        if name in out:  # the GAN starts from the decoder: both need their split
            try:
                attacks.split_validation(
                    np.zeros((sizes[name], 1)),
                    out[name].val_fraction,
                    batch_size=out[name].batch_size,
                    key=jax.random.key(0),
                )
            except ValueError as e:
                raise ValueError(f"{name} attack: {e}") from e
    return out


def check_attacks(cfg: RunConfig, ds: Any, devices: int = 1) -> None:
    """Raises ``ValueError`` if an attack of ``cfg`` cannot run on ``ds`` (call before training)."""
    if not cfg.attacks:
        return
    for setting, (train_x, _) in attacker_sets(cfg, ds).items():
        try:
            attack_configs(cfg, len(train_x), devices)
        except ValueError as e:
            raise ValueError(
                f"attack setting {setting!r} ({len(train_x)} attacker images): {e}"
            ) from e


def _judge(result: dict[str, Any], baseline: dict[str, float]) -> dict[str, Any]:
    """Adds the baseline, the gain over it and the ``informative`` flag to one attack result."""
    informative = bool(result["mse"] <= INFORMATIVE_MSE_RATIO * baseline["mse"])
    return {
        **result,
        "baseline": {k: baseline[k] for k in ("mse", "psnr", "ssim")},
        "gain_db": result["psnr"] - baseline["psnr"],
        "informative": informative,
    }


def run_attacks(
    cfg: RunConfig,
    ds: Any,
    encode: Callable[[jax.Array, jax.Array], jax.Array],
    clean_encode: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    feature_shape: tuple[int, ...],
    mesh: Mesh,
    workdir: str | None = None,
    stream: TextIO | None = None,
    num_examples: int = 8,
    client_identity: Any = None,
) -> dict[str, Any]:
    """``{attack: {setting: result}}`` for ``cfg.attacks``, each beside the mean-image baseline.

    ``encode(key, images)`` is the client as the attacker queries it (the threat model's
    obfuscation), ``clean_encode(key, images)`` its differentiable copy without any obfuscation
    (the white-box attacker's model); ``ds`` holds the images. Nothing here needs a Trainer.

    A result holds the metrics (``mse``, ``psnr``, ``ssim``, ``ref_*``), ``steps``, ``converged``,
    ``curve`` (validation curve), ``baseline`` (the mean training image's metrics on the same
    images), ``gain_db`` and ``informative`` (MSE ≤ 0.9 × baseline MSE), and ``wall_time_s``.

    With a ``workdir``, the trained attacks (decoder, GAN) checkpoint their progress under
    ``<workdir>/attack_checkpoints/<setting>/<attack>`` (:class:`cem_jax.attacks.Resume`), so that
    a killed run resumes them where they were; ``client_identity`` (JSON, e.g. a digest of the
    client's weights) is part of what a checkpoint must match. The caller removes the folder once
    the results are saved (:func:`clear_attack_checkpoints`).
    """
    out = stream if stream is not None else sys.stdout
    devices = mesh.shape["data"]
    base_key = jax.random.fold_in(jax.random.key(cfg.attack_seed), _TAG_ATTACK)
    results: dict[str, Any] = {a: {} for a in cfg.attacks}
    rows: list[np.ndarray] = []
    defense = cfg.defense_spec()

    def clean_features(images: jax.Array) -> jax.Array:
        return clean_encode(base_key, images)  # no randomness is used

    def progress(d: dict) -> None:
        extra = f" val MSE {d['val_mse']:.5f} lr x{d['lr_scale']:g}" if "val_mse" in d else ""
        extra += f" | {d['steps_per_s']:.2f} steps/s" if "steps_per_s" in d else ""
        print(
            f"  {d['attack']} [{setting}] step {d['step']}/{d['max_steps']}: loss {d['loss']:.5f}"
            f"{extra}{' (converged)' if d.get('converged') else ''}",
            file=out,
            flush=True,
        )

    for s_index, (setting, (train_x, eval_x)) in enumerate(attacker_sets(cfg, ds).items()):
        key = jax.random.fold_in(base_key, s_index)
        confs = attack_configs(cfg, len(train_x), devices)
        print(
            f"attack [{setting}]: attacker has {len(train_x)} images, evaluated on {len(eval_x)}",
            file=out,
            flush=True,
        )
        rows.append(eval_x[:num_examples].astype(np.float32) / 255.0)
        baseline = attacks.mean_image_baseline(train_x, eval_x, mesh=mesh)
        dec = None

        def resume(attack: str, setting: str = setting) -> attacks.Resume | None:
            if workdir is None:
                return None
            return attacks.Resume(
                storage.join(workdir, ATTACK_CHECKPOINT_SUBDIR, setting, attack),
                identity={
                    "client": client_identity,
                    "threat_model": cfg.threat_model,
                    "setting": setting,
                },
                stream=out,
            )

        if "decoder" in cfg.attacks or "gan" in cfg.attacks:
            dec = attacks.decoder_attack(
                encode,
                train_x,
                eval_x,
                config=confs["decoder"],
                key=jax.random.fold_in(key, 0),
                feature_shape=feature_shape,
                mesh=mesh,
                progress=progress,
                resume=resume("decoder"),
            )
            if "decoder" in results:
                results["decoder"][setting] = _judge(dec.summary(), baseline)
                rows.append(np.asarray(dec.examples[:num_examples]))
        if "gan" in results:
            gan_x = train_x if cfg.gan_train_subset is None else train_x[: cfg.gan_train_subset]
            gan = attacks.gan_attack(
                encode,
                gan_x,
                eval_x,
                config=confs["gan"],
                key=jax.random.fold_in(key, 1),
                init_decoder=dec.decoder,
                mesh=mesh,
                progress=progress,
                resume=resume("gan"),
            )
            rec = _judge(gan.summary(), baseline)
            rec["wall_time_s"] += dec.wall_time_s  # the GAN starts from the decoder
            results["gan"][setting] = rec
            rows.append(np.asarray(gan.examples[:num_examples]))
        if "whitebox" in results:
            wb_images = eval_x[: cfg.whitebox_images]
            wb = attacks.whitebox_attack(
                clean_features,
                encode,
                wb_images,
                config=confs["whitebox"],
                key=jax.random.fold_in(key, 2),
                sigma=defense.sigma,
                mesh=mesh,
                progress=progress,
            )
            wb_base = attacks.mean_image_baseline(train_x, wb_images, mesh=mesh)
            results["whitebox"][setting] = _judge(wb.summary(), wb_base)
            rows.append(np.asarray(wb.examples[:num_examples]))
        for name in results:
            if setting in results[name]:
                m = results[name][setting]
                print(
                    f"  {name} [{setting}]: MSE {m['mse']:.4f} PSNR {m['psnr']:.2f} dB SSIM "
                    f"{m['ssim']:.4f} | baseline MSE {m['baseline']['mse']:.4f} "
                    f"({m['gain_db']:+.2f} dB) | {m['steps']} steps, "
                    f"{'converged' if m['converged'] else 'NOT converged'}"
                    f"{'' if m['informative'] else ', UNINFORMATIVE'} "
                    f"({format_duration(m['wall_time_s'])})",
                    file=out,
                    flush=True,
                )
    if workdir is not None and rows and parallel.is_main_process():  # one writer (DESIGN §5)
        save_grid(rows, storage.join(workdir, FIGURE_FILE))
    return results


def clear_attack_checkpoints(workdir: str) -> None:
    """Removes ``<workdir>/attack_checkpoints`` (once the attacks' results are saved)."""
    storage.remove_tree(storage.join(workdir, ATTACK_CHECKPOINT_SUBDIR))


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
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())  # atomic, local or gs://
