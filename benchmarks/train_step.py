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
``schema``                        integer   3      the version of this key set (3 now; absent
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
JSON_SCHEMA = 3
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
    rates: dict[str, float], *, source: str, torch_rate: float | None = None
) -> dict[str, object]:
    """The ``--json`` object (keys in the module docstring) from the median images/s per
    ``"<defense>/<sync>"`` and of the PyTorch step (``None``: not timed)."""
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


def _torch_step_module():
    """:mod:`benchmarks.torch_train_step`, from beside this file (also when run as a script with an
    older checkout on the path, whose ``benchmarks`` has no such module)."""
    if __package__:
        from benchmarks import torch_train_step

        return torch_train_step
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_train_step.py")
    spec = importlib.util.spec_from_file_location("_torch_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    if FLAGS.json:
        print(json.dumps(json_result(result, source=_source(), torch_rate=torch_rate)))
        return
    print(
        f"\n{FLAGS.arch}, batch {bs}, {FLAGS.image_size}px, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, source {_source()}"
    )
    print(f"{'step':<24}{'images/s':>10}   (rounds: ...)")
    rows = dict(rates)
    if torch_rates:
        rows[f"{TORCH_DEFENSE}/torch"] = torch_rates
    for k, r in rows.items():
        print(f"{k:<24}{statistics.median(r):>10.1f}   {', '.join(f'{x:.0f}' for x in r)}")
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
