"""One whole run, as ``experiments/run.py`` drives it: data → train → attacks → report.

Everything here takes a :class:`~cem_jax.config.RunConfig` and a workdir; nothing reads flags. The
workdir receives ``checkpoints/`` (orbax, resumable), ``metrics.jsonl`` (one line per epoch),
``results.json`` (written atomically, only complete) and ``reconstructions.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np

from cem_jax import config as config_lib
from cem_jax import data as data_lib
from cem_jax import parallel, train
from cem_jax.checkpoint import Checkpointer
from cem_jax.progress import ProgressBar, format_duration

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


class RunError(RuntimeError):
    """A run cannot go on (incompatible workdir, NaN loss, unfinished run for an attack)."""


def load_data(cfg: config_lib.RunConfig, cache_dir: str | None = None) -> data_lib.Dataset:
    """The dataset of ``cfg`` with its train/test subsets applied."""
    ds = data_lib.load_dataset(
        cfg.dataset,
        cfg.data_dir,
        train_subset=cfg.train_subset,
        subset_seed=cfg.seed,
        cache_dir=cache_dir,
    )
    if cfg.test_subset is not None and cfg.test_subset < ds.num_test:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.permutation(ds.num_test)[: cfg.test_subset])
        ds = _replace(ds, test_images=ds.test_images[idx], test_labels=ds.test_labels[idx])
    return ds


def _replace(ds: data_lib.Dataset, **kw: Any) -> data_lib.Dataset:
    import dataclasses

    return dataclasses.replace(ds, **kw)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _fmt(v: Any, spec: str = ".4f") -> str:
    if isinstance(v, float | int | np.floating):
        return format(float(v), spec)
    return "-" if v is None else str(v)


def run(
    cfg: config_lib.RunConfig,
    *,
    workdir: str,
    num_devices: int | None = None,
    cache_dir: str | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Trains (or resumes), attacks and reports; returns the ``results.json`` content."""
    out = stream if stream is not None else sys.stdout
    os.makedirs(workdir, exist_ok=True)
    results_path = os.path.join(workdir, RESULTS_FILE)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # Refuse a workdir of another configuration before doing anything expensive.
    if os.path.isdir(ckpt_dir):
        ckpt = Checkpointer(ckpt_dir)
        if ckpt.latest_step() is not None:
            train.check_compatible(ckpt.read_meta(), cfg, ckpt.directory)
        ckpt.close()
    if os.path.exists(results_path):
        with open(results_path) as f:
            previous = json.load(f)
        if previous.get("fingerprint") == cfg.training_fingerprint() and previous.get(
            "attack_config"
        ) == _attack_config(cfg):
            print(f"{workdir} already holds a finished run; its summary:", file=out)
            print(summary(previous), file=out)
            return previous

    t_start = time.perf_counter()
    mesh = parallel.make_mesh(num_devices)
    t0 = time.perf_counter()
    ds = load_data(cfg, cache_dir)
    load_s = time.perf_counter() - t0
    defense = cfg.defense_spec()
    print(
        f"cem_jax | {cfg.dataset} ({ds.num_train} train / {ds.num_test} test, {ds.image_size}px, "
        f"loaded in {load_s:.1f}s from {ds.source}) | {cfg.arch} cut {cfg.resolved_cut_layer} | "
        f"defense {cfg.defense} (sigma={defense.sigma}, lambda={defense.lambd if defense.cem else 0}, "
        f"mode={cfg.cem_mode}) | {cfg.epochs} epochs, batch {cfg.batch_size} | "
        f"{mesh.shape[parallel.DATA_AXIS]} x {jax.devices()[0].platform} | workdir {workdir}",
        file=out,
        flush=True,
    )
    metrics_path = os.path.join(workdir, METRICS_FILE)
    bars: dict[str, ProgressBar] = {}
    run_start = time.perf_counter()
    epochs_done_here = [0]

    def on_epoch_start(epoch: int, trainer: train.Trainer) -> None:
        bars["bar"] = ProgressBar(
            trainer.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", stream=out
        )

    def on_step(epoch: int, i: int, m: dict[str, float]) -> None:
        bar = bars["bar"]
        extra = f"loss {m['loss']:.3f}"
        if "cem" in m:
            extra += f" L_C {m['cem']:.4f}"
        rate = bar.rate()
        if rate > 0:
            steps_left = (bar.total - bar.count - 1) + (cfg.epochs - epoch) * bar.total
            extra += f" | run ETA {format_duration(steps_left / rate)}"
        bar.update(1, extra)

    def on_epoch_end(m: dict[str, float]) -> None:
        bars["bar"].close()
        epochs_done_here[0] += 1
        elapsed = time.perf_counter() - run_start
        left = cfg.epochs - m["epoch"]
        eta = elapsed / epochs_done_here[0] * left
        line = (
            f"epoch {m['epoch']}/{cfg.epochs}: loss {m['loss']:.4f} ce {m['ce']:.4f}"
            + (f" L_C {m['cem']:.4f}" if "cem" in m else "")
            + f" | test acc clean {m['clean_acc']:.4f} defended {m['defended_acc']:.4f}"
            + (f" | leakage <= {m['leakage_bits']:.1f} bits" if "leakage_bits" in m else "")
            + f" | {m['steps_per_s']:.2f} steps/s ({m['steps_per_s'] * cfg.batch_size:.0f} img/s)"
            + f" | run ETA {format_duration(eta)}"
        )
        print(line, file=out, flush=True)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")

    try:
        result = train.train(
            cfg,
            ds,
            workdir=workdir,
            mesh=mesh,
            on_epoch_start=on_epoch_start,
            on_step=on_step,
            on_epoch_end=on_epoch_end,
        )
    except train.NaNLossError as e:
        raise RunError(str(e)) from e
    if result.resumed_from_epoch:
        print(f"(resumed after epoch {result.resumed_from_epoch})", file=out)
    results = finish(cfg, result.trainer, result.state, result.history, workdir=workdir, stream=out)
    results["train_wall_time_s"] = result.wall_time_s
    results["wall_time_s"] = time.perf_counter() - t_start
    write_json_atomic(results_path, results)
    print(summary(results), file=out, flush=True)
    return results


def finish(
    cfg: config_lib.RunConfig,
    trainer: train.Trainer,
    state: train.TrainState,
    history: list[dict[str, float]],
    *,
    workdir: str | None,
    stream: TextIO,
) -> dict[str, Any]:
    """The final leakage certificate and the attacks, as the ``results.json`` dictionary."""
    ds = trainer.dataset
    t0 = time.perf_counter()
    final = dict(history[-1]) if history else {}
    leakage_full = final.get("leakage_bits_full")  # computed by the last mixture refresh
    if leakage_full is None:
        leakage_full = trainer.leakage_bound(state, covariance="full")
    results: dict[str, Any] = {
        "status": "finished",
        "format_version": train.FORMAT_VERSION,
        "config": cfg.to_dict(),
        "fingerprint": cfg.training_fingerprint(),
        "attack_config": _attack_config(cfg),
        "dataset": {
            "name": ds.name,
            "source": ds.source,
            "num_train": ds.num_train,
            "num_test": ds.num_test,
        },
        "devices": f"{trainer.mesh.shape[parallel.DATA_AXIS]} x {jax.devices()[0].platform}",
        "history": history,
        "final": {
            "clean_acc": final.get("clean_acc"),
            "defended_acc": final.get("defended_acc"),
            "leakage_bits_diagonal": final.get("leakage_bits"),
            "leakage_bits_full": leakage_full,
            "leakage_time_s": time.perf_counter() - t0,
        },
        "attacks": {},
    }
    if cfg.attacks:
        from cem_jax import report

        results["attacks"] = report.run_attacks(cfg, trainer, state, workdir=workdir, stream=stream)
    return results


def attack_workdir(
    workdir: str,
    *,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Re-runs the attacks of a finished run (``experiments.attack``); updates ``results.json``.

    The file is replaced atomically once every attack is done, so an interrupted attack never
    leaves partial numbers behind; re-running it restarts the attacks cleanly.
    """
    import dataclasses

    from cem_jax import client

    out = stream if stream is not None else sys.stdout
    t_start = time.perf_counter()
    try:
        cfg, meta, ckpt = client.read_run(workdir)
    except client.RunNotFoundError as e:
        raise RunError(str(e)) from e
    cfg = dataclasses.replace(cfg, **(overrides or {}))
    cfg.validate()
    ds = load_data(cfg, cache_dir)
    trainer = train.Trainer(cfg, ds)
    state, _ = ckpt.restore(trainer.init_state())
    ckpt.close()
    print(f"attacking the client of {workdir} ({cfg.defense}, {meta['epoch']} epochs)", file=out)
    results_path = os.path.join(workdir, RESULTS_FILE)
    results = finish(cfg, trainer, state, list(meta["history"]), workdir=workdir, stream=out)
    if os.path.exists(results_path):
        with open(results_path) as f:
            previous = json.load(f)
        results["train_wall_time_s"] = previous.get("train_wall_time_s")
    results["wall_time_s"] = time.perf_counter() - t_start
    write_json_atomic(results_path, results)
    print(summary(results), file=out, flush=True)
    return results


def _attack_config(cfg: config_lib.RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    keys = [k for k in d if k.startswith(("attack", "gan")) or k == "threat_model"]
    return json.loads(json.dumps({k: d[k] for k in keys}))


def summary(results: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""
    cfg = results["config"]
    fin = results["final"]
    lines = [
        "",
        "=" * 78,
        f"{cfg['dataset']} | {cfg['arch']} | defense {cfg['defense']} | {len(results['history'])} epochs"
        f" | wall {format_duration(results.get('wall_time_s', 0))}",
        "-" * 78,
        f"test accuracy   clean {_fmt(fin['clean_acc'])}   defended (what the server gets) "
        f"{_fmt(fin['defended_acc'])}",
        f"leakage bound   {_fmt(fin['leakage_bits_full'], '.1f')} bits/image (full covariance), "
        f"{_fmt(fin['leakage_bits_diagonal'], '.1f')} (diagonal)",
    ]
    attacks = results.get("attacks") or {}
    if attacks:
        lines.append("-" * 78)
        lines.append(
            f"{'attack':<10}{'setting':<16}{'MSE':>10}{'PSNR dB':>10}{'SSIM':>10}{'time':>10}"
        )
        for name, settings in attacks.items():
            if not isinstance(settings, dict):
                continue
            for setting, m in settings.items():
                if not isinstance(m, dict) or "mse" not in m:
                    continue
                lines.append(
                    f"{name:<10}{setting:<16}{_fmt(m['mse']):>10}{_fmt(m['psnr'], '.2f'):>10}"
                    f"{_fmt(m['ssim']):>10}{format_duration(m.get('wall_time_s', 0)):>10}"
                )
    lines.append("=" * 78)
    return "\n".join(lines)
