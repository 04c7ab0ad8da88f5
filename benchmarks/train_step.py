"""Images/s of the defended train step (VGG11 cut 4, batch 128, 32 px) per defense, as the epoch
loop runs it: the host gathers each batch, the jitted step runs, the metrics are fetched; beside
it, the same step of the reference in PyTorch.

    python -m benchmarks.train_step                  # table
    python -m benchmarks.train_step --json           # one JSON object (keys below)
    python -m benchmarks.train_step --notorch        # without the PyTorch step
    PYTHONPATH=/path/to/old/checkout python benchmarks/train_step.py   # the same, on older code

Each defense's step is compiled once, then timed in interleaved rounds (so a noisy, shared machine
slows every variant alike) and the median round is reported, in two ways:

* ``window``: the metrics stay on the device and are fetched once per 16 steps
  (``Trainer.metrics_every``), as training does;
* ``step``: the host fetches the loss after every step (``float(loss)``), so one step is never in
  flight while the next is dispatched: the per-step host sync the multi-host issue removed.

``--torch`` (on by default when torch is importable) also times the reference's ``noise + CEM``
step in PyTorch (:mod:`benchmarks.torch_train_step`: the same model, noise, CEM hinge, loss and
SGD, the official code's loops and separate CEM backward, as many threads as JAX has cores) in the
same rounds, with as many steps, after the JAX variants of each round; it runs when ``cem_noise``
is among ``--defenses``.

Beside images/s, each row shows its roofline figures (:mod:`benchmarks.roofline`): the achieved
GFLOP/s (images/s x the GFLOP per image XLA's cost analysis counts in the defense's compiled step)
and that rate as a percentage of the float32 matmul peak ``jnp.dot`` reaches in the same process,
measured after the timed rounds. The PyTorch row computes the same model and is given
``cem_noise``'s count. On the 2-core CPU the VGG11 cut-4 step counts 0.771 GFLOP per image for both
``none`` and ``cem_noise`` at batch 128.

The figures the issues name: CEM's cost (cem_noise / noise, target ≥ 0.95), the sync cost
(window / step), and cem_noise against the PyTorch reference (measured with ``--torch``; the issue
quotes ~230 images/s on the 2-core CI CPU). The script also runs against older checkouts (their
``Trainer._train_step(state, idx)``), which is how the before / after figures of a refactor are
measured.

``--json`` prints one object whose keys a script can rely on across versions (``schema`` says which
form it is; a key, once added, keeps its name, unit and meaning; docs/benchmarks.md has the same
table):

================================  ========  =====  ===============================================
key                               unit      since  meaning
================================  ========  =====  ===============================================
``schema``                        integer   3      the version of this key set (4 now; absent
                                                   before 3: 2 if ``source`` is there, else 1)
``source``                        text      2      the checkout timed: ``<path> @ <git rev>``
``<defense>/<sync>``              images/s  2      median round of ``<defense>``'s JAX step with
                                                   ``<sync>`` (``window`` or ``step``) fetching,
                                                   for every ``--defenses`` × ``--sync``
``<defense>``                     images/s  1      the same as ``<defense>/window`` (schema 1's
                                                   only figure); present when ``window`` is timed
``cem_noise/torch``               images/s  3      median round of the PyTorch reference step;
                                                   with ``--torch`` and ``cem_noise`` timed
``cem_noise/window_over_torch``   ratio     3      ``cem_noise/window`` / ``cem_noise/torch``;
                                                   when both are there
``<defense>/gflop_per_image``     GFLOP     4      XLA's count of ``<defense>``'s compiled train
                                                   step, divided by the batch size; when the
                                                   checkout's trainer exposes the jitted step
``matmul_gflops``                 GFLOP/s   4      median rate of a float32 2048×2048 ``jnp.dot``
                                                   in the same process, after the timed rounds
================================  ========  =====  ===============================================
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import time

from absl import app, flags

FLAGS = flags.FLAGS

PYTORCH_REFERENCE_IMG_S = 230.0  # noise + CEM, 2 threads, measured on the CI machine (issue text)
WINDOW = 16
JSON_SCHEMA = 4
TORCH_DEFENSE = "cem_noise"  # the defense the PyTorch reference step computes


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The program's flags (defined when it runs, not on import: tests import the module)."""
    kw = {"flag_values": fv}
    flags.DEFINE_bool(
        "json",
        False,
        "Print one JSON object {key: value} (module docstring) and nothing else.",
        **kw,
    )
    flags.DEFINE_list(
        "defenses",
        ["none", "noise", "cem_noise", "adversarial"],
        "Steps to time (any defense preset).",
        **kw,
    )
    flags.DEFINE_list(
        "sync", ["window", "step"], "Metric fetching: window (every 16 steps), step.", **kw
    )
    flags.DEFINE_integer("batch_size", 128, "Batch size.", **kw)
    flags.DEFINE_integer("steps", 8, "Timed steps per round.", **kw)
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median reported).", **kw)
    flags.DEFINE_string("arch", "vgg11_bn_sgm", "Architecture.", **kw)
    flags.DEFINE_integer("image_size", 32, "Image size.", **kw)
    flags.DEFINE_bool(
        "torch",
        torch_available(),
        "Also time the reference's noise + CEM step in PyTorch (benchmarks/torch_train_step.py) "
        "in the same rounds, when cem_noise is timed (default: on when torch is importable).",
        **kw,
    )


def json_result(
    rates: dict[str, float],
    *,
    source: str,
    torch_rate: float | None = None,
    gflop_per_image: dict[str, float] | None = None,
    matmul_gflops: float | None = None,
) -> dict[str, object]:
    """The ``--json`` object (keys in the module docstring) from the median images/s per
    ``"<defense>/<sync>"``, of the PyTorch step, the GFLOP per image per defense and the matmul
    peak in GFLOP/s (``None``, or a defense left out: not measured, its key left out)."""
    out: dict[str, object] = {"schema": JSON_SCHEMA, "source": source}
    out.update(rates)
    for key, value in rates.items():
        defense, sync = key.split("/")
        if sync == "window":
            out[defense] = value  # schema 1's key
    if torch_rate is not None:
        out[f"{TORCH_DEFENSE}/torch"] = torch_rate
        window = rates.get(f"{TORCH_DEFENSE}/window")
        if window is not None:
            out[f"{TORCH_DEFENSE}/window_over_torch"] = window / torch_rate
    for defense, gflop in (gflop_per_image or {}).items():
        out[f"{defense}/gflop_per_image"] = gflop
    if matmul_gflops is not None:
        out["matmul_gflops"] = matmul_gflops
    return out


def _source() -> str:
    import cem_jax

    here = os.path.dirname(os.path.dirname(os.path.abspath(cem_jax.__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        rev = "?"
    return f"{here} @ {rev or '?'}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _sibling_module(name: str):
    """``benchmarks.<name>``, from beside this file (also when run as a script with an older
    checkout on the path, whose ``benchmarks`` may not have it)."""
    if __package__:
        return importlib.import_module(f"benchmarks.{name}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_step_module():
    """:mod:`benchmarks.torch_train_step`, from beside this file."""
    return _sibling_module("torch_train_step")


def step_gflop_per_image(tr, state, idx) -> float | None:
    """GFLOP per image of ``tr``'s compiled train step, lowered with the arguments the benchmark
    calls it with (:func:`benchmarks.roofline.compiled_gflop`); ``None`` for an older checkout's
    trainer (no ``steps.train``) or a backend without a FLOP count."""
    import jax

    train = getattr(getattr(tr, "steps", None), "train", None)
    if not hasattr(train, "lower") or not all(
        hasattr(tr, a) for a in ("rest", "batch", "train_key")
    ):
        return None
    roofline = _sibling_module("roofline")
    try:
        with jax.set_mesh(tr.mesh):
            gflop = roofline.compiled_gflop(train, state, tr.rest, tr.batch(idx), tr.train_key)
    except RuntimeError:  # the backend's cost analysis has no "flops"
        return None
    return gflop / len(idx)


def make_torch_step(batch: int, image_size: int):
    """The PyTorch reference step (threads = the cores JAX sees), warmed up twice."""
    try:
        module = _torch_step_module()
    except ImportError as e:
        raise app.UsageError(f"--torch: {e}") from e
    import torch

    torch.set_num_threads(_cores())
    step = module.make_step(batch, image_size=image_size)
    for _ in range(2):  # the first steps allocate
        step()
    return step


def main(argv: list[str]) -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    del argv
    import jax
    import numpy as np

    from cem_jax import config as config_lib
    from cem_jax import data as data_lib
    from cem_jax import train

    bs = FLAGS.batch_size
    ds = data_lib.synthetic_dataset(
        num_train=max(4 * bs, 512), num_test=64, image_size=FLAGS.image_size, num_classes=10, seed=0
    )
    trainers, states, steppers = {}, {}, {}
    for name in FLAGS.defenses:
        cfg = config_lib.make_config(
            "paper", defense=name, arch=FLAGS.arch, batch_size=bs, epochs=1, kmeans_iterations=5
        )
        tr = train.Trainer(cfg, ds)
        st = tr.init_state()
        if tr.defense.cem:
            st, _ = tr.refresh_mixture(st, 1)  # CEM active, as from epoch 2 on
        if hasattr(tr, "step"):  # pure steps: the host feeds the batch
            step = tr.step
        else:  # before: the jitted step gathered the batch from a device copy of the data
            step = lambda s, idx, tr=tr: tr._train_step(s, jax.numpy.asarray(idx))  # noqa: E731
        order = tr.epoch_order(1)
        t0 = time.perf_counter()
        with jax.set_mesh(tr.mesh):
            st, m = step(st, order[0])
            jax.block_until_ready(m["loss"])
        if not FLAGS.json:
            print(f"{name}: compiled + first step in {time.perf_counter() - t0:.1f}s", flush=True)
        trainers[name], states[name], steppers[name] = tr, st, step

    torch_step = None
    if FLAGS.torch and TORCH_DEFENSE in trainers:
        t0 = time.perf_counter()
        torch_step = make_torch_step(bs, FLAGS.image_size)
        if not FLAGS.json:
            print(f"torch: built + 2 steps in {time.perf_counter() - t0:.1f}s", flush=True)

    variants = [(n, s) for n in trainers for s in FLAGS.sync]
    rates: dict[str, list[float]] = {f"{n}/{s}": [] for n, s in variants}
    torch_rates: list[float] = []
    for _ in range(FLAGS.rounds):
        for name, sync in variants:
            tr, step, st = trainers[name], steppers[name], states[name]
            order = tr.epoch_order(2)
            with jax.set_mesh(tr.mesh):
                st, m = step(st, order[0])  # warm
                jax.block_until_ready(m["loss"])
                pending, losses = [], []
                t0 = time.perf_counter()
                for i in range(FLAGS.steps):
                    st, m = step(st, order[(i + 1) % len(order)])
                    if sync == "step":
                        losses.append(float(m["loss"]))
                    else:
                        pending.append(m)
                        if len(pending) >= WINDOW:
                            losses += [float(x["loss"]) for x in jax.device_get(pending)]
                            pending.clear()
                losses += [float(x["loss"]) for x in jax.device_get(pending)]
                jax.block_until_ready(st)
            rates[f"{name}/{sync}"].append(FLAGS.steps * bs / (time.perf_counter() - t0))
            assert np.all(np.isfinite(losses)), (name, losses)
            states[name] = st
        if torch_step is not None:
            torch_step()  # warm, as the JAX variants
            t0 = time.perf_counter()
            losses = [float(torch_step()) for _ in range(FLAGS.steps)]  # synchronous on a CPU
            torch_rates.append(FLAGS.steps * bs / (time.perf_counter() - t0))
            assert np.all(np.isfinite(losses)), ("torch", losses)
    result = {k: statistics.median(r) for k, r in rates.items()}
    torch_rate = statistics.median(torch_rates) if torch_rates else None
    # roofline figures, after the timed rounds so they do not perturb them
    gflop: dict[str, float] = {}
    for name, tr in trainers.items():
        g = step_gflop_per_image(tr, states[name], tr.epoch_order(2)[0])
        if g is not None:
            gflop[name] = g
    roofline = _sibling_module("roofline")
    peak = roofline.matmul_peak_gflops()
    if FLAGS.json:
        out = json_result(
            result,
            source=_source(),
            torch_rate=torch_rate,
            gflop_per_image=gflop,
            matmul_gflops=peak,
        )
        print(json.dumps(out))
        return
    print(
        f"\n{FLAGS.arch}, batch {bs}, {FLAGS.image_size}px, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, source {_source()}"
    )
    print(f"{'step':<24}{'images/s':>10}{'GFLOP/s':>10}{'% peak':>8}   (rounds: ...)")
    rows = dict(rates)
    if torch_rates:
        rows[f"{TORCH_DEFENSE}/torch"] = torch_rates
    for k, r in rows.items():
        rate, g = statistics.median(r), gflop.get(k.split("/")[0])
        pct = roofline.percent_of_peak(rate * g, peak) if g else 0.0
        roof = f"{rate * g:>10.1f}{pct:>8.1f}" if g else f"{'-':>10}{'-':>8}"
        print(f"{k:<24}{rate:>10.1f}{roof}   {', '.join(f'{x:.0f}' for x in r)}")
    counts = ", ".join(f"{n} {g:.3f}" for n, g in gflop.items()) or "not available"
    print(
        f"GFLOP per image (XLA's count of the compiled step): {counts}"
        + (f"; the PyTorch row uses {TORCH_DEFENSE}'s (same model)" if torch_rates else "")
    )
    print(f"% peak: of a float32 2048x2048 jnp.dot in this process, {peak:.1f} GFLOP/s")
    main_sync = FLAGS.sync[0]
    get = {n: result.get(f"{n}/{main_sync}") for n in trainers}
    if "window" in FLAGS.sync and "step" in FLAGS.sync:
        for n in trainers:
            w, s = result[f"{n}/window"], result[f"{n}/step"]
            print(f"{n}: window / per-step sync = {w / s:.3f}")
    if get.get("none"):
        for n in trainers:
            if n != "none":
                print(f"{n} / none = {get[n] / get['none']:.3f}  ({main_sync})")
    if get.get("noise") and get.get("cem_noise"):
        ratio = get["cem_noise"] / get["noise"]
        print(
            f"\ncem_noise / noise = {ratio:.3f}  (CEM costs {100 * (1 - ratio):.1f}% of the step; "
            "target <= 5%)"
        )
    if get.get("cem_noise") and torch_rate is not None:
        print(
            f"cem_noise/{main_sync} / cem_noise/torch (PyTorch reference step, {_cores()} threads) "
            f"= {get['cem_noise'] / torch_rate:.2f}x"
        )
    elif get.get("cem_noise"):
        r = get["cem_noise"] / PYTORCH_REFERENCE_IMG_S
        print(
            f"cem_noise vs PyTorch reference (~{PYTORCH_REFERENCE_IMG_S:.0f} img/s on 2 CPU "
            f"threads, quoted; --torch measures it): {r:.2f}x"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
