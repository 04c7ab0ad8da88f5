"""Images/s of the defended train step (VGG11 cut 4, batch 128, 32 px) per defense.

    python -m benchmarks.train_step            # table
    python -m benchmarks.train_step --json     # one JSON object: {step name: images/s, ...}

Each defense's step is compiled once, then the steps are timed in interleaved rounds (so a noisy,
shared machine slows them alike) and the median round is reported. The figures the issues name:
CEM's cost (cem_noise / noise, target ≥ 0.95) and cem_noise against the PyTorch reference's
~230 images/s on the 2-core CI CPU.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "Print one JSON object {step: images/s} and nothing else.")
flags.DEFINE_list(
    "defenses", ["none", "noise", "cem_noise", "adversarial"], "Steps to time (any defense preset)."
)
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 8, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median reported).")
flags.DEFINE_string("arch", "vgg11_bn_sgm", "Architecture.")
flags.DEFINE_integer("image_size", 32, "Image size.")

PYTORCH_REFERENCE_IMG_S = 230.0  # noise + CEM, 2 threads, measured on the CI machine (issue text)


def main(argv: list[str]) -> None:
    del argv
    import jax

    from cem_jax import config as config_lib
    from cem_jax import data as data_lib
    from cem_jax import train

    bs = FLAGS.batch_size
    ds = data_lib.synthetic_dataset(
        num_train=max(4 * bs, 512), num_test=64, image_size=FLAGS.image_size, num_classes=10, seed=0
    )
    trainers, states = {}, {}
    for name in FLAGS.defenses:
        cfg = config_lib.make_config(
            "paper", defense=name, arch=FLAGS.arch, batch_size=bs, epochs=1, kmeans_iterations=5
        )
        tr = train.Trainer(cfg, ds)
        st = tr.init_state()
        if tr.defense.cem:
            st, _ = tr.refresh_mixture(st, 1)  # CEM active, as from epoch 2 on
        order = tr.epoch_order(1)
        t0 = time.perf_counter()
        with jax.set_mesh(tr.mesh):
            st, m = tr._train_step(st, jax.numpy.asarray(order[0]))
            jax.block_until_ready(m["loss"])
        if not FLAGS.json:
            print(f"{name}: compiled + first step in {time.perf_counter() - t0:.1f}s")
        trainers[name], states[name] = tr, st

    rates: dict[str, list[float]] = {n: [] for n in trainers}
    for _ in range(FLAGS.rounds):
        for name, tr in trainers.items():
            order = tr.epoch_order(2)
            st = states[name]
            with jax.set_mesh(tr.mesh):
                st, m = tr._train_step(st, jax.numpy.asarray(order[0]))  # warm
                jax.block_until_ready(m["loss"])
                t0 = time.perf_counter()
                for i in range(FLAGS.steps):
                    st, m = tr._train_step(st, jax.numpy.asarray(order[(i + 1) % len(order)]))
                jax.block_until_ready(m["loss"])
            rates[name].append(FLAGS.steps * bs / (time.perf_counter() - t0))
            states[name] = st
    result = {n: statistics.median(r) for n, r in rates.items()}
    if FLAGS.json:
        print(json.dumps(result))
        return
    print(
        f"\n{FLAGS.arch}, batch {bs}, {FLAGS.image_size}px, {jax.device_count()} x {jax.devices()[0].platform}"
    )
    print(f"{'step':<18}{'images/s':>10}   (rounds: ...)")
    for n, r in rates.items():
        print(f"{n:<18}{result[n]:>10.1f}   {', '.join(f'{x:.0f}' for x in r)}")
    if "none" in result:
        for n in result:
            if n != "none":
                print(f"{n} / none = {result[n] / result['none']:.3f}")
    if "noise" in result and "cem_noise" in result:
        ratio = result["cem_noise"] / result["noise"]
        print(
            f"\ncem_noise / noise = {ratio:.3f}  (CEM costs {100 * (1 - ratio):.1f}% of the step; target <= 5%)"
        )
    if "cem_noise" in result:
        r = result["cem_noise"] / PYTORCH_REFERENCE_IMG_S
        print(
            f"cem_noise vs PyTorch reference (~{PYTORCH_REFERENCE_IMG_S:.0f} img/s on 2 CPU threads): {r:.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
