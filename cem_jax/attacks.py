"""Model inversion attacks on a trained client: the decoder attack and its WGAN-GP refinement.

Threat model (DESIGN §2 step 4, reference §6-7): the attacker queries the trained client as a black
box and sees exactly what the server sees — every obfuscation applied, fresh noise on every query. The
client is a pure traceable function ``encode(key, images) -> features`` (``images`` uint8
``[B, H, W, 3]`` or float in ``[0, 1]``); it is called inside the jitted steps with a fresh key per
step. The attacker learns an inverse ``decoder(features) -> images`` on pairs it builds itself.

* :func:`decoder_attack` — the reference's decoder attack (§6): MSE on ``[0, 1]`` images, Adam with
  PyTorch's coupled L2 weight decay, cosine learning rate per epoch, batch 256, final decoder
  evaluated in eval mode.
* :func:`gan_attack` — the reference's GAN attack (§7): WGAN-GP with the ``DGWGAN32`` critic and the
  generator started from the trained decoder, generator loss ``−E D(G(z)) + 1500·MSE``.
* :func:`split_settings` — the two data settings (train-time, inference-time).

Every step is one ``jax.jit`` over the (decoder, optimizer[, critic]) state, split once with
``nnx.split``, donated, and merged back at the end. With a mesh, batches are sharded on its ``data``
axis and the state is replicated. The modules passed in are never modified: the attacks work on copies
and return the trained copy.

>>> import numpy as np, jax
>>> train, test = np.zeros((50, 4)), np.zeros((20, 4))
>>> {k: (len(a), len(b)) for k, (a, b) in split_settings(train, test).items()}
{'train_time': (50, 20), 'inference_time': (18, 2)}
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from cem_jax import metrics as metrics_lib
from cem_jax import parallel
from cem_jax.models.decoder import decoder_from_name
from cem_jax.models.layers import Conv, torch_bias_init, torch_kernel_init

Encode = Callable[[jax.Array, jax.Array], jax.Array]
Progress = Callable[[dict], None]

__all__ = [
    "AttackResult",
    "DecoderAttackConfig",
    "GanAttackConfig",
    "WGANCritic",
    "decoder_attack",
    "evaluate_decoder",
    "gan_attack",
    "split_settings",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_fields(
    cfg: Any,
    *,
    ints: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
    nonnegative: tuple[str, ...] = (),
) -> None:
    """Raises ``ValueError`` naming the first field of ``cfg`` outside its accepted range."""
    for name in ints:
        v = getattr(cfg, name)
        _require(isinstance(v, int) and v >= 1, f"{name}={v!r}: accepted an integer >= 1.")
    for name in positive:
        v = getattr(cfg, name)
        _require(v > 0, f"{name}={v}: accepted > 0.")
    for name in nonnegative:
        v = getattr(cfg, name)
        _require(v >= 0, f"{name}={v}: accepted >= 0.")


@dataclasses.dataclass(frozen=True)
class DecoderAttackConfig:
    """The decoder attack (reference §6.3). ``lr`` follows a per-epoch cosine to ``final_lr``."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    final_lr: float = 1e-5
    decoder: str = "res_normN8C64"
    eval_batch_size: int = 256
    num_examples: int = 16

    def __post_init__(self):
        _check_fields(
            self,
            ints=("epochs", "batch_size", "eval_batch_size"),
            positive=("lr",),
            nonnegative=("num_examples", "weight_decay"),
        )
        _require(
            0 <= self.final_lr <= self.lr,
            f"final_lr={self.final_lr}: accepted 0 <= final_lr <= lr ({self.lr}).",
        )


@dataclasses.dataclass(frozen=True)
class GanAttackConfig:
    """The WGAN-GP attack (reference §7). Both learning rates follow a per-epoch cosine to 0."""

    epochs: int = 150
    batch_size: int = 128
    critic_lr: float = 5e-3
    generator_lr: float = 5e-4
    n_critic: int = 10
    mse_weight: float = 1500.0
    gp_weight: float = 10.0
    b1: float = 0.5
    b2: float = 0.999
    critic_width: int = 64
    eval_batch_size: int = 256
    num_examples: int = 16

    def __post_init__(self):
        _check_fields(
            self,
            ints=("epochs", "batch_size", "n_critic", "critic_width", "eval_batch_size"),
            positive=("critic_lr", "generator_lr"),
            nonnegative=("num_examples", "mse_weight", "gp_weight"),
        )
        for name in ("b1", "b2"):
            v = getattr(self, name)
            _require(0 <= v < 1, f"{name}={v}: accepted 0 <= {name} < 1.")


@dataclasses.dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
      metrics: per-image means over the evaluation set: ``"mse"``, ``"psnr"`` (dB), ``"ssim"``
        (NaN unless the targets are images ``[N, H, W, C]`` with ``H, W >= 11``), and the reference's
        batch conventions ``"ref_psnr"`` (PSNR of each batch's MSE) and ``"ref_ssim"``
        (pytorch_ssim, zero padding), batch-size weighted.
      wall_time_s: training + evaluation time.
      decoder: the trained decoder (generator for the GAN attack), a new module.
      examples: ``[n, ...]`` reconstructions of the first ``n`` evaluation images (float32).
      history: one dict per epoch (``"epoch"``, ``"loss"``, ...).
    """

    metrics: dict[str, float]
    wall_time_s: float
    decoder: nnx.Module
    examples: np.ndarray
    history: list[dict] = dataclasses.field(default_factory=list)


def split_settings(
    train_images: np.ndarray, test_images: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two attack settings of reference §6.1 as ``name -> (attacker's train set, eval set)``.

    ``"train_time"``: trained on the client's training set, evaluated on the test set.
    ``"inference_time"``: trained on the first 90 % of the test set, evaluated on the last 10 %.
    """
    n = len(test_images)
    cut = n * 9 // 10
    _require(
        0 < cut < n,
        f"test_images: {n} images cannot be split 90/10 into two non-empty parts; accepted >= 2.",
    )
    return {
        "train_time": (train_images, test_images),
        "inference_time": (test_images[:cut], test_images[cut:]),
    }


# --------------------------------------------------------------------------------------------------
# Helpers


def _to_target(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; any float input is the target as it is."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _clone(module: nnx.Module) -> nnx.Module:
    """A deep copy with fresh buffers (the attack's steps donate their state)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.array(a, copy=True), state))


def _cosine(base: float, final: float, epoch: int, epochs: int) -> float:
    """PyTorch CosineAnnealingLR(T_max=epochs, eta_min=final) at ``epoch`` (0-based)."""
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _check_data(name: str, images: Any, *, min_len: int, what: str) -> None:
    _require(
        isinstance(images, np.ndarray | jax.Array) and images.ndim >= 2,
        f"{name}: expected an array [N, ...] (uint8 images [N, H, W, 3] or floats), got "
        f"{type(images).__name__} with shape {np.shape(images)}.",
    )
    _require(
        images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating),
        f"{name}: dtype {images.dtype}; accepted uint8 or floating.",
    )
    _require(len(images) >= min_len, f"{name}: {len(images)} samples; {what}.")


def _check_pair(train: Any, eval_: Any, batch_size: int) -> None:
    _check_data(
        "train_images",
        train,
        min_len=batch_size,
        what=f"accepted at least batch_size={batch_size}",
    )
    _check_data("eval_images", eval_, min_len=1, what="accepted at least 1")
    _require(
        train.shape[1:] == eval_.shape[1:] and train.dtype == eval_.dtype,
        f"eval_images: shape {eval_.shape[1:]} / dtype {eval_.dtype} per sample must match "
        f"train_images {train.shape[1:]} / {train.dtype}.",
    )


def _check_encode(
    encode: Encode, sample: np.ndarray, feature_shape: tuple[int, ...] | None, key: jax.Array
):
    """Traces ``encode`` abstractly; returns its per-sample feature shape (checked if given)."""
    spec = jax.ShapeDtypeStruct((2, *sample.shape[1:]), sample.dtype)
    try:
        out = jax.eval_shape(encode, key, spec)
    except Exception as e:  # noqa: BLE001 — re-raised with context
        raise ValueError(
            f"encode(key, images) failed on images of shape {spec.shape} {spec.dtype}: {e}"
        ) from e
    got = tuple(out.shape[1:])
    _require(
        out.shape[:1] == (2,),
        f"encode: returned shape {out.shape} for a batch of 2; the batch axis must be kept.",
    )
    if feature_shape is not None:
        _require(
            tuple(feature_shape) == got,
            f"feature_shape={tuple(feature_shape)} does not match encode's output {got} for "
            f"images of shape {sample.shape[1:]}.",
        )
    return got


def _check_decoder_output(graphdef, state, feature_shape, target_shape) -> None:
    def apply(state, z):
        return nnx.merge(graphdef, state)(z)

    z = jax.ShapeDtypeStruct((2, *feature_shape), jnp.float32)
    try:
        out = jax.eval_shape(apply, state, z)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"decoder: failed on features of shape {(2, *feature_shape)}: {e}") from e
    _require(
        tuple(out.shape[1:]) == tuple(target_shape),
        f"decoder: outputs {tuple(out.shape[1:])} per sample, the targets are {tuple(target_shape)}.",
    )


class _Placement:
    """Puts batches and state on the mesh (or leaves them on the default device)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def check(self, name: str, batch_size: int) -> None:
        if self.mesh is not None:
            n = self.mesh.shape[parallel.DATA_AXIS]
            _require(
                batch_size % n == 0,
                f"{name}={batch_size}: must be a multiple of the mesh's data axis size ({n}).",
            )

    def batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return parallel.shard_batch(x, self.mesh)

    def state(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        return parallel.replicate(tree, self.mesh)

    def jit(self, fn: Callable, **kwargs) -> Callable:
        if self.mesh is not None:
            kwargs["out_shardings"] = parallel.replicated(self.mesh)
        return jax.jit(fn, **kwargs)

    def context(self):
        if self.mesh is None:
            return _NullContext()
        return jax.set_mesh(self.mesh)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _epoch_batches(key: jax.Array, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """``[steps, batch_size]`` indices of one shuffled epoch (the short last batch dropped)."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


# --------------------------------------------------------------------------------------------------
# Evaluation


def _per_sample_metrics(rec: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-sample ``mse``, ``psnr``, ``ssim`` and the reference's zero-padded SSIM, each ``[B]``."""
    b = target.shape[0]
    image_like = target.ndim == 4 and min(target.shape[1:3]) >= metrics_lib.SSIM_FILTER_SIZE
    if target.ndim == 4:
        flat_r, flat_t = rec, target
    else:
        flat_r, flat_t = rec.reshape(b, 1, 1, -1), target.reshape(b, 1, 1, -1)
    out = {"mse": metrics_lib.mse(flat_r, flat_t), "psnr": metrics_lib.psnr(flat_r, flat_t)}
    if image_like:
        out["ssim"] = metrics_lib.ssim(rec, target)
        out["ref_ssim"] = jax.vmap(
            lambda r, t: metrics_lib.reference_mse_psnr_ssim(r[None], t[None])["ssim"]
        )(rec, target)
    else:
        out["ssim"] = jnp.full((b,), jnp.nan)
        out["ref_ssim"] = jnp.full((b,), jnp.nan)
    return out


def _evaluate(
    encode: Encode,
    graphdef,
    state,
    images: np.ndarray,
    *,
    key: jax.Array,
    batch_size: int,
    placement: _Placement,
    num_examples: int,
) -> tuple[dict[str, float], np.ndarray]:
    """Eval-mode metrics of the decoder ``(graphdef, state)`` over ``images`` in padded batches."""
    placement.check("eval_batch_size", batch_size)

    def step(state, batch, i):
        decoder = nnx.merge(graphdef, state)
        decoder.eval()
        feats = encode(jax.random.fold_in(key, i), batch)
        rec = decoder(feats)
        return rec, _per_sample_metrics(rec, _to_target(batch))

    step = jax.jit(step)
    n = len(images)
    sums: dict[str, float] = {}
    ref_psnr_sum = 0.0
    examples = []
    with placement.context():
        for i, start in enumerate(range(0, n, batch_size)):
            batch = images[start : start + batch_size]
            valid = len(batch)
            if valid < batch_size:  # pad to the static shape; padded rows are masked out below
                pad = np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            rec, per = step(state, placement.batch(batch), jnp.int32(i))
            per = {k: np.asarray(v, np.float64)[:valid] for k, v in per.items()}
            for k, v in per.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
            batch_mse = float(per["mse"].mean())
            ref_psnr_sum += valid * float(-10.0 * np.log10(max(batch_mse, 1e-10)))
            have = sum(len(e) for e in examples)
            if have < num_examples:
                examples.append(np.asarray(rec[: min(valid, num_examples - have)], np.float32))
    out = {k: v / n for k, v in sums.items()}
    out["ref_psnr"] = ref_psnr_sum / n
    ex = np.concatenate(examples) if examples else np.zeros((0, *images.shape[1:]), np.float32)
    return out, ex


def _finish(
    encode: Encode,
    decoder: nnx.Module,
    eval_images: np.ndarray,
    *,
    key: jax.Array,
    config: Any,
    placement: _Placement,
    t0: float,
    history: list[dict],
) -> AttackResult:
    """Evaluates a trained decoder/generator (eval mode) and packs the :class:`AttackResult`."""
    graphdef, state = nnx.split(decoder)
    metrics, examples = _evaluate(
        encode,
        graphdef,
        state,
        eval_images,
        key=key,
        batch_size=config.eval_batch_size,
        placement=placement,
        num_examples=config.num_examples,
    )
    return AttackResult(
        metrics=metrics,
        wall_time_s=time.perf_counter() - t0,
        decoder=decoder,
        examples=examples,
        history=history,
    )


def evaluate_decoder(
    encode: Encode,
    decoder: nnx.Module,
    images: np.ndarray,
    *,
    key: jax.Array,
    batch_size: int,
    mesh: Mesh | None = None,
    num_examples: int = 16,
) -> dict[str, Any]:
    """Reconstruction metrics of ``decoder(encode(key_b, x))`` against ``x`` (decoder in eval mode).

    Args:
      encode: the client as the attacker queries it, ``(key, images[B, ...]) -> features``.
      decoder: an NNX module ``features -> reconstructions`` (not modified).
      images: ``[N, H, W, 3]`` uint8 (targets ``x / 255``) or floats ``[N, ...]`` (targets as is).
      key: noise key; batch ``b`` uses ``fold_in(key, b)``.
      batch_size: evaluation batch; the short last batch is padded and masked.
      mesh: optional device mesh (batches sharded on ``data``).
      num_examples: how many reconstructions of the first images to return.
    Returns:
      ``{"mse", "psnr", "ssim", "ref_psnr", "ref_ssim"}`` floats (see :class:`AttackResult`) and
      ``"examples"``: ``[num_examples, ...]`` float32.
    """
    _check_data("images", images, min_len=1, what="accepted at least 1")
    _require(batch_size >= 1, f"batch_size={batch_size}: accepted >= 1.")
    placement = _Placement(mesh)
    graphdef, state = nnx.split(decoder)
    state = placement.state(state)
    out, ex = _evaluate(
        encode,
        graphdef,
        state,
        images,
        key=key,
        batch_size=batch_size,
        placement=placement,
        num_examples=num_examples,
    )
    return {**out, "examples": ex}


# --------------------------------------------------------------------------------------------------
# Decoder attack


def _decoder_train_step(graphdef, encode: Encode, key: jax.Array, placement: _Placement):
    """The jitted step ``(state, batch, step) -> (state, loss)`` of the decoder attack.

    ``state`` is ``nnx.state((decoder, optimizer))`` (donated); the features are
    ``encode(fold_in(key, step), batch)``; loss ``mean((decoder(z) - target)²)``, train mode.
    """

    def train_step(state, batch, step):
        decoder, optimizer = nnx.merge(graphdef, state)
        feats = jax.lax.stop_gradient(encode(jax.random.fold_in(key, step), batch))
        target = _to_target(batch)

        def loss_fn(d):
            return jnp.mean((d(feats) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(decoder)
        optimizer.update(decoder, grads)
        return nnx.state((decoder, optimizer)), loss

    return placement.jit(train_step, donate_argnums=0)


def decoder_attack(
    encode: Encode,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    config: DecoderAttackConfig,
    key: jax.Array,
    feature_shape: tuple[int, ...] | None,
    mesh: Mesh | None = None,
    decoder: nnx.Module | None = None,
    progress: Progress | None = None,
) -> AttackResult:
    """Trains an inversion decoder on ``(encode(x), x)`` pairs and evaluates it (reference §6).

    Loss ``mean((decoder(encode(key_t, x)) − x01)²)`` with the decoder in train mode; Adam with
    coupled L2 weight decay (``add_decayed_weights`` before ``adam``, as PyTorch's Adam), learning
    rate on a per-epoch cosine from ``lr`` to ``final_lr`` (``T_max = epochs``); batches reshuffled
    every epoch, the short last batch dropped. Then the final decoder is evaluated in eval mode on
    ``eval_images`` (fresh noise per batch).

    Args:
      encode: the client as the attacker queries it, ``(key, images[B, ...]) -> features[B, ...]``.
      train_images: the attacker's training images, ``[N, H, W, 3]`` uint8 (targets ``x / 255``) or
        floats ``[N, ...]`` (targets as they are; any shape with a custom ``decoder``).
      eval_images: evaluation images, same per-sample shape and dtype.
      config: hyper-parameters.
      key: all randomness (decoder init, shuffling, encode noise, evaluation noise).
      feature_shape: per-sample shape of ``encode``'s output, e.g. ``(8, 8, 8)``; checked against
        ``encode`` (``None``: taken from it).
      mesh: optional device mesh; batches are sharded on its ``data`` axis.
      decoder: a custom decoder module (not modified; a trained copy is returned); default: build
        ``config.decoder`` for ``feature_shape`` and the image size.
      progress: called after every epoch with ``{"attack", "epoch", "epochs", "loss", "lr",
        "steps_per_s"}``.
    Returns:
      :class:`AttackResult`.
    """
    t0 = time.perf_counter()
    _check_pair(train_images, eval_images, config.batch_size)
    placement = _Placement(mesh)
    placement.check("batch_size", config.batch_size)
    feature_shape = _check_encode(encode, train_images[:2], feature_shape, key)
    k_init, k_shuffle, k_train, k_eval = jax.random.split(key, 4)
    target_shape = train_images.shape[1:]
    if decoder is None:
        _require(
            train_images.ndim == 4 and target_shape[0] == target_shape[1] and target_shape[2] == 3,
            f"train_images: shape {train_images.shape}; the built-in decoder needs square RGB "
            "images [N, H, H, 3] (pass decoder= for other data).",
        )
        _require(
            len(feature_shape) == 3 and feature_shape[0] == feature_shape[1],
            f"feature_shape={feature_shape}: the built-in decoder needs square features (s, s, c).",
        )
        decoder = decoder_from_name(
            config.decoder,
            in_channels=feature_shape[2],
            feature_size=feature_shape[0],
            image_size=target_shape[0],
            rngs=nnx.Rngs(k_init),
        )
    else:
        decoder = _clone(decoder)
    decoder.train()

    steps_per_epoch = len(train_images) // config.batch_size

    def schedule(count):
        epoch = count // steps_per_epoch
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / config.epochs))
        return config.final_lr + (config.lr - config.final_lr) * cos

    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))
    optimizer = nnx.Optimizer(decoder, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((decoder, optimizer))
    dec_graphdef, dec_state = nnx.split(decoder)
    _check_decoder_output(dec_graphdef, dec_state, feature_shape, target_shape)
    state = placement.state(state)

    train_step = _decoder_train_step(graphdef, encode, k_train, placement)
    history: list[dict] = []
    step = 0
    with placement.context():
        for epoch in range(config.epochs):
            te = time.perf_counter()
            losses = []
            for idx in _epoch_batches(k_shuffle, epoch, len(train_images), config.batch_size):
                state, loss = train_step(state, placement.batch(train_images[idx]), jnp.int32(step))
                losses.append(loss)
                step += 1
            mean_loss = float(jnp.mean(jnp.stack(losses)))
            dt = time.perf_counter() - te
            rec = {
                "attack": "decoder",
                "epoch": epoch + 1,
                "epochs": config.epochs,
                "loss": mean_loss,
                "lr": _cosine(config.lr, config.final_lr, epoch, config.epochs),
                "steps_per_s": steps_per_epoch / dt,
            }
            history.append(rec)
            if progress is not None:
                progress(dict(rec))

    decoder, _ = nnx.merge(graphdef, state)
    return _finish(
        encode,
        decoder,
        eval_images,
        key=k_eval,
        config=config,
        placement=placement,
        t0=t0,
        history=history,
    )


# --------------------------------------------------------------------------------------------------
# GAN attack


class WGANCritic(nnx.Module):
    """``DGWGAN32`` of GMI (reference §7), generalised to any image side. ``[B, H, W, c] -> [B]``.

    ``conv5x5/2 (c -> w)``, LeakyReLU 0.2; 2 x [``conv5x5/2``, InstanceNorm (affine), LeakyReLU 0.2]
    (``w -> 2w -> 4w``); then a ``valid`` conv whose kernel covers the remaining ``ceil(H/8)``
    side (4 for 32 px, 6 for 48, 8 for 64) down to one scalar. As in GMI, the first layer has no
    normalisation. PyTorch default initialisation.
    """

    def __init__(self, image_size: int, *, in_channels: int = 3, width: int = 64, rngs: nnx.Rngs):
        _require(image_size >= 1, f"image_size={image_size}: accepted >= 1.")

        def conv(cin, cout, k, stride, pad):
            return Conv(
                cin,
                cout,
                (k, k),
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=torch_kernel_init(),
                bias_init=torch_bias_init(cin * k * k),
                rngs=rngs,
            )

        side = image_size
        for _ in range(3):
            side = (side + 1) // 2
        self.conv1 = conv(in_channels, width, 5, 2, 2)
        self.conv2 = conv(width, 2 * width, 5, 2, 2)
        self.norm2 = nnx.InstanceNorm(2 * width, epsilon=1e-5, rngs=rngs)
        self.conv3 = conv(2 * width, 4 * width, 5, 2, 2)
        self.norm3 = nnx.InstanceNorm(4 * width, epsilon=1e-5, rngs=rngs)
        self.head = conv(4 * width, 1, side, 1, 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.conv1(x), 0.2)
        h = jax.nn.leaky_relu(self.norm2(self.conv2(h)), 0.2)
        h = jax.nn.leaky_relu(self.norm3(self.conv3(h)), 0.2)
        return self.head(h).reshape(x.shape[0])


def _gradient_penalty(critic: WGANCritic, real: jax.Array, fake: jax.Array, key: jax.Array):
    """``mean_i (||∇_x D(x̃_i)||₂ − 1)²`` at ``x̃ = real + α(fake − real)``, ``α ~ U[0, 1)`` per image."""
    alpha = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1))
    interp = real + alpha * (fake - real)
    g = jax.grad(lambda t: jnp.sum(critic(t)))(interp)
    norm = jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) + 1e-12)
    return jnp.mean((norm - 1.0) ** 2)


def gan_attack(
    encode: Encode,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    config: GanAttackConfig,
    key: jax.Array,
    init_decoder: nnx.Module,
    mesh: Mesh | None = None,
    progress: Progress | None = None,
) -> AttackResult:
    """WGAN-GP refinement of a trained inversion decoder (reference §7).

    The generator ``G`` is a copy of ``init_decoder`` (train mode); the critic ``D`` is
    :class:`WGANCritic`. Every step trains ``D`` on one batch with
    ``−(E D(x01) − E D(G(z))) + gp_weight·GP``; every ``n_critic``-th step then trains ``G`` on the
    same batch (same noisy features) with ``−E D(G(z)) + mse_weight·MSE(G(z), x01)``. Adam
    ``(b1, b2)``, learning rates on a per-epoch cosine from ``critic_lr`` / ``generator_lr`` to 0
    over ``epochs``. The final generator is evaluated in eval mode like the decoder attack.

    Args:
      encode: the client as the attacker queries it.
      train_images: ``[N, H, W, 3]`` uint8 (or float in [0, 1]) images.
      eval_images: evaluation images, same per-sample shape and dtype.
      config: hyper-parameters.
      key: all randomness.
      init_decoder: the trained decoder (not modified).
      mesh: optional device mesh.
      progress: called after every epoch with ``{"attack": "gan", "epoch", "epochs", "loss",
        "critic_loss", "generator_loss", "steps_per_s"}``.
    Returns:
      :class:`AttackResult` with the trained generator as ``decoder``.
    """
    t0 = time.perf_counter()
    _check_pair(train_images, eval_images, config.batch_size)
    _require(
        train_images.ndim == 4,
        f"train_images: shape {train_images.shape}; the GAN attack needs images [N, H, W, C].",
    )
    placement = _Placement(mesh)
    placement.check("batch_size", config.batch_size)
    feature_shape = _check_encode(encode, train_images[:2], None, key)
    k_init, k_shuffle, k_train, k_eval = jax.random.split(key, 4)
    target_shape = train_images.shape[1:]

    generator = _clone(init_decoder)
    generator.train()
    g_graphdef, g_state = nnx.split(generator)
    _check_decoder_output(g_graphdef, g_state, feature_shape, target_shape)
    critic = WGANCritic(
        target_shape[0],
        in_channels=target_shape[2],
        width=config.critic_width,
        rngs=nnx.Rngs(k_init),
    )

    def adam():
        return optax.inject_hyperparams(optax.adam)(learning_rate=0.0, b1=config.b1, b2=config.b2)

    opt_g = nnx.Optimizer(generator, adam(), wrt=nnx.Param)
    opt_d = nnx.Optimizer(critic, adam(), wrt=nnx.Param)
    graphdef, state = nnx.split((generator, critic, opt_g, opt_d))
    state = placement.state(state)

    def critic_step(state, batch, step, lr):
        g, d, opt_g, opt_d = nnx.merge(graphdef, state)
        k_enc, k_gp = jax.random.split(jax.random.fold_in(k_train, step))
        feats = jax.lax.stop_gradient(encode(k_enc, batch))
        real = _to_target(batch)
        fake = jax.lax.stop_gradient(g(feats))  # train mode: BN statistics update, as in PyTorch

        def loss_fn(d):
            wdist = jnp.mean(d(real)) - jnp.mean(d(fake))
            return -wdist + config.gp_weight * _gradient_penalty(d, real, fake, k_gp), wdist

        (loss, wdist), grads = nnx.value_and_grad(loss_fn, has_aux=True)(d)
        opt_d.opt_state.hyperparams["learning_rate"][...] = lr
        opt_d.update(d, grads)
        return nnx.state((g, d, opt_g, opt_d)), (loss, wdist)

    def generator_step(state, batch, step, lr):
        g, d, opt_g, opt_d = nnx.merge(graphdef, state)
        k_enc, _ = jax.random.split(jax.random.fold_in(k_train, step))
        feats = jax.lax.stop_gradient(encode(k_enc, batch))
        real = _to_target(batch)

        def loss_fn(g):
            fake = g(feats)
            return -jnp.mean(d(fake)) + config.mse_weight * jnp.mean((fake - real) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(g)
        opt_g.opt_state.hyperparams["learning_rate"][...] = lr
        opt_g.update(g, grads)
        return nnx.state((g, d, opt_g, opt_d)), loss

    critic_step = placement.jit(critic_step, donate_argnums=0)
    generator_step = placement.jit(generator_step, donate_argnums=0)
    steps_per_epoch = len(train_images) // config.batch_size
    history: list[dict] = []
    step = 0
    with placement.context():
        for epoch in range(config.epochs):
            te = time.perf_counter()
            lr_d = jnp.float32(_cosine(config.critic_lr, 0.0, epoch, config.epochs))
            lr_g = jnp.float32(_cosine(config.generator_lr, 0.0, epoch, config.epochs))
            c_losses, w_dists, g_losses = [], [], []
            for idx in _epoch_batches(k_shuffle, epoch, len(train_images), config.batch_size):
                batch = placement.batch(train_images[idx])
                s = jnp.int32(step)
                state, (c_loss, wdist) = critic_step(state, batch, s, lr_d)
                c_losses.append(c_loss)
                w_dists.append(wdist)
                step += 1
                if step % config.n_critic == 0:
                    state, g_loss = generator_step(state, batch, s, lr_g)
                    g_losses.append(g_loss)
            c = float(jnp.mean(jnp.stack(c_losses)))
            g_mean = float(jnp.mean(jnp.stack(g_losses))) if g_losses else float("nan")
            dt = time.perf_counter() - te
            rec = {
                "attack": "gan",
                "epoch": epoch + 1,
                "epochs": config.epochs,
                "loss": g_mean,
                "critic_loss": c,
                "generator_loss": g_mean,
                "wasserstein": float(jnp.mean(jnp.stack(w_dists))),
                "steps_per_s": steps_per_epoch / dt,
            }
            history.append(rec)
            if progress is not None:
                progress(dict(rec))

    generator, _, _, _ = nnx.merge(graphdef, state)
    return _finish(
        encode,
        generator,
        eval_images,
        key=k_eval,
        config=config,
        placement=placement,
        t0=t0,
        history=history,
    )
