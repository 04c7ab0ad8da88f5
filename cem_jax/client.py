"""A trained client, loaded back from a run's workdir, as a black box anyone can attack.

Example (after ``python -m experiments.run --preset=quick``)::

    client = load_client("runs/cifar10_cem_noise_quick")
    z = client(images, jax.random.key(0))  # images [B, H, W, 3] in [0, 1] -> transmitted features
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TextIO

import jax

from cem_jax import storage, train
from cem_jax.checkpoint import Checkpointer, CheckpointError
from cem_jax.config import RunConfig, config_from_dict


class RunNotFoundError(FileNotFoundError):
    """The workdir holds no finished (or no readable) run."""


def read_run(
    workdir: str, *, stream: TextIO | None = None
) -> tuple[RunConfig, dict[str, Any], Checkpointer]:
    """The config and the metadata of the last checkpoint of a *finished* run in ``workdir``.

    Opens the checkpoints read-only (a read-only workdir is fine). A damaged newest step is
    skipped with a warning on ``stream`` (default stderr); if what remains is not finished, the
    error says so.
    """
    storage.check(workdir, "workdir")  # a scheme other than gs://, or gs:// without gcsfs
    ckpt_dir = storage.join(workdir, "checkpoints")
    if not storage.isdir(ckpt_dir):
        raise RunNotFoundError(
            f"{workdir}: no checkpoints/ folder; expected the --workdir of a run of experiments.run."
        )
    ckpt = Checkpointer(ckpt_dir, writable=False, stream=stream)
    if not ckpt.all_steps():
        raise RunNotFoundError(f"{workdir}: checkpoints/ holds no checkpoint.")
    try:
        meta = ckpt.read_meta()
    except CheckpointError as e:
        raise RunNotFoundError(f"{workdir}: {e}") from e
    if meta.get("format_version") != train.FORMAT_VERSION:
        raise RunNotFoundError(
            f"{workdir}: checkpoint format {meta.get('format_version')!r}, this version reads "
            f"{train.FORMAT_VERSION}; it was written by an incompatible version of cem_jax."
        )
    _check_finished(meta, workdir, ckpt)
    try:
        cfg = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunNotFoundError(f"{workdir}: unreadable run config ({e}).") from e
    return cfg, meta, ckpt


def _check_finished(meta: dict[str, Any], workdir: str, ckpt: Checkpointer) -> None:
    if meta.get("finished"):
        return
    skipped = "".join(f" Checkpoint {s} was skipped: {why}." for s, why in ckpt.skipped)
    raise RunNotFoundError(
        f"{workdir}: the run is not finished (last completed epoch {meta.get('epoch')} of "
        f"{meta.get('config', {}).get('epochs')}); re-run experiments.run with the same flags."
        + skipped
    )


def restore_finished(ckpt: Checkpointer, template: Any, workdir: str) -> tuple[Any, dict[str, Any]]:
    """The state and metadata of the newest checkpoint that restores; it must be a finished run's.

    If the final checkpoint's arrays are damaged, the fallback is an earlier epoch: refused (with
    :class:`RunNotFoundError`) rather than passed off as the trained client.
    """
    try:
        state, meta = ckpt.restore(template)
    except CheckpointError as e:
        raise RunNotFoundError(f"{workdir}: {e}") from e
    _check_finished(meta, workdir, ckpt)
    return state, meta


def restore_state(
    cfg: RunConfig,
    meta: dict[str, Any],
    ckpt: Checkpointer,
    workdir: str = "the workdir",
    *,
    mesh: Any = None,
) -> tuple[train.ModelParts, Any]:
    """Rebuilds the model of ``cfg`` and restores the final train state from ``ckpt``.

    The one restore of a finished run (:func:`load_client`, ``experiments.attack``): the template
    is :func:`cem_jax.train.state_template`, the one resume also uses, so it has every entry
    training saves (the adversarial defense's local decoder included). With ``mesh`` the state
    comes back replicated over it.
    """
    parts = train.build_model_parts(cfg, meta["num_classes"], meta["image_size"])
    template, _ = train.state_template(cfg, parts, meta["num_classes"], int(meta["image_size"]))
    if mesh is not None:
        from cem_jax import parallel

        template = parallel.replicate(template, mesh)
    state, _ = restore_finished(ckpt, template, workdir)
    return parts, state


@dataclasses.dataclass
class Client:
    """``client(images, key) -> features`` exactly as the server receives them."""

    config: RunConfig
    feature_shape: tuple[int, int, int]
    image_size: int
    encode: Callable[[jax.Array, jax.Array], jax.Array]  # (key, images) -> features (jitted)
    encode_clean: Callable[[jax.Array], jax.Array]  # images -> pre-noise features

    def __call__(self, images: jax.Array, key: jax.Array) -> jax.Array:
        return self.encode(key, images)


def load_client(workdir: str, *, noise_only: bool = False) -> Client:
    """The trained client of a finished run, with its defense's obfuscation (or only its noise)."""
    cfg, meta, ckpt = read_run(workdir)
    try:
        parts, state = restore_state(cfg, meta, ckpt, workdir)
    finally:
        ckpt.close()
    from flax import nnx

    model = nnx.merge(parts.graphdef_eval, state.params, state.batch_stats, parts.rest)
    defense = cfg.defense_spec()
    if noise_only:
        defense = dataclasses.replace(defense, dropout_ratio=0.0, topk_ratio=0.0)
    encode = train.make_encode(model, defense, meta["mean"], meta["std"])
    no_defense = dataclasses.replace(
        defense, sigma=0.0, dropout_ratio=0.0, topk_ratio=0.0, cem=False, lambd=0.0
    )
    clean = train.make_encode(model, no_defense, meta["mean"], meta["std"])
    return Client(
        config=cfg,
        feature_shape=tuple(parts.feature_shape),
        image_size=int(meta["image_size"]),
        encode=jax.jit(encode),
        encode_clean=jax.jit(lambda images: clean(jax.random.key(0), images)),
    )
