r"""Sweep defenses × σ × λ × seeds, then collect the table and the privacy–utility plot.

    cem-sweep --defenses=none,noise,cem_noise --sigmas=0.05,0.1 --seeds=1,2,3 --preset=quick \
        --root=runs/sweep                                        # one run per grid point and seed
    cem-sweep ... --num_shards=4 --shard_index=$SLURM_ARRAY_TASK_ID   # on a cluster
    cem-sweep ... --collect_only                                 # table.md, table.json, privacy_utility.png
    python -m experiments.sweep ...                              # the same

Each run is an ordinary run (own workdir under ``--root``, resumable); finished runs are skipped, so
re-running a sweep resumes it. On several hosts (``--coordinator_address`` ..., or detected: see
``cem-run --help``) every process runs every run of its shard together; process 0 writes. Every shard runs its share of the grid; ``--collect_only`` (run once,
after them) reads every ``results.json`` and writes ``table.md`` / ``table.json`` (mean ± std and n seeds
per grid point) and ``privacy_utility.png`` under ``--root``. Every other flag is a RunConfig field,
applied to every run.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import flags

from cem_jax import config as config_lib
from cem_jax import errors, storage
from cem_jax.cli import collect, config_flags
from cem_jax.progress import format_duration

FLAGS = flags.FLAGS

AXES = ("defense", "sigma", "lambd", "seed")  # swept by the list flags below, not single flags
CONFIG_FLAGS: list[str] = []
OWN_FLAGS: list[str] = []


def define_flags(fv: flags.FlagValues = FLAGS) -> list[str]:
    """Defines the program's flags on ``fv`` (once for the global ``FLAGS``); their names."""
    if fv is FLAGS and OWN_FLAGS:
        return OWN_FLAGS
    kw = {"flag_values": fv}
    flags.DEFINE_list("defenses", ["none", "noise", "cem_noise"], "Defense presets to sweep.", **kw)
    config_flags.define_tuple_flag(
        "sigmas", (), "Noise levels to sweep (empty: each defense's default).", float, **kw
    )
    config_flags.define_tuple_flag(
        "lambdas",
        (),
        "CEM weights to sweep, cem_* defenses only (empty: the default).",
        float,
        **kw,
    )
    config_flags.define_tuple_flag(
        "seeds",
        (),
        "Training seeds: one run (workdir <point>_seed<k>) per seed and grid point (empty: one run "
        "with the default seed).",
        int,
        **kw,
    )
    names = config_flags.define_config_flags(fv, exclude=AXES)
    flags.DEFINE_enum(
        "preset", "paper", list(config_lib.PRESETS), "Run preset of every grid point.", **kw
    )
    flags.DEFINE_string(
        "root", "runs/sweep", "Folder holding one workdir per run, and the table.", **kw
    )
    flags.DEFINE_string(
        "study",
        None,
        "A study spec (JSON, e.g. experiments/studies/frontier_cifar10.json): its groups replace "
        "--defenses/--sigmas/--lambdas/--seeds, its preset, dataset and common settings apply "
        "unless given as flags.",
        **kw,
    )
    flags.DEFINE_string(
        "records",
        None,
        "A records file (JSON lines, one per finished run; default: the study's 'records'; "
        "--records= for none): runs it holds are skipped and collected from it when their "
        "workdir is gone (another machine's); every finished run is added to it. Commit it to "
        "carry a study across machines.",
        **kw,
    )
    flags.DEFINE_integer("num_shards", 1, "Split the grid over this many processes.", **kw)
    flags.DEFINE_integer("shard_index", 0, "This process's shard (0-based).", **kw)
    flags.DEFINE_bool(
        "collect_only",
        False,
        "Run nothing: write the table and the plot of the finished runs.",
        **kw,
    )
    flags.DEFINE_string(
        "cache_dir", os.path.expanduser("~/.cache/cem_jax"), "Decoded-dataset cache ('' off).", **kw
    )
    own = ["defenses", "sigmas", "lambdas", "seeds", *names]
    own += [
        "preset",
        "root",
        "study",
        "records",
        "num_shards",
        "shard_index",
        "collect_only",
        "cache_dir",
    ]
    own += config_flags.define_device_flags(fv)
    own += config_flags.define_distributed_flags(fv)
    if fv is FLAGS:
        CONFIG_FLAGS[:], OWN_FLAGS[:] = names, own
    return own


_STUDY: dict = {}


def points() -> list[dict]:
    if FLAGS.study:
        _STUDY.clear()
        _STUDY.update(collect.load_study(FLAGS.study))
        for name in ("preset", "dataset"):  # the study's, unless given as a flag
            if name in _STUDY and not FLAGS[name].present:
                FLAGS[name].value = _STUDY[name]
        return list(_STUDY["points"])
    return collect.grid(FLAGS.defenses, FLAGS.sigmas, FLAGS.lambdas, FLAGS.seeds)


def common_overrides(point: dict | None = None) -> dict:
    """The study's common settings (:func:`cem_jax.cli.collect.study_common`: with ``point``, its
    ``cem_common`` too when the point's defense is a CEM one), then the config flags the user set
    (plus ``$CEM_DATA_DIR``)."""
    common = collect.study_common(_STUDY, point)
    overrides = {**common, **config_flags.config_overrides(FLAGS, CONFIG_FLAGS)}
    if overrides.get("data_dir") is None:
        overrides["data_dir"] = os.environ.get("CEM_DATA_DIR") or None
    return overrides


def workdir_of(point: dict) -> str:
    return collect.workdir_of(FLAGS.root, FLAGS.dataset, FLAGS.preset, point)


def check_grid(grid: list[dict]) -> list[config_lib.RunConfig]:
    """Every run's validated config, before any runs: a bad σ / λ / seed fails in seconds, not hours.

    Raises :class:`cem_jax.errors.UsageError` naming the bad flag (or grid point) and what is accepted.
    """
    if not FLAGS.defenses:
        raise errors.UsageError("--defenses is empty: name at least one defense preset.")
    storage.check(FLAGS.root, "--root")  # a local folder or gs://bucket/path
    if FLAGS.num_shards < 1:
        raise errors.UsageError(f"num_shards={FLAGS.num_shards}: accepted values are >= 1.")
    if not 0 <= FLAGS.shard_index < FLAGS.num_shards:
        raise errors.UsageError(
            f"shard_index={FLAGS.shard_index}: accepted 0..{FLAGS.num_shards - 1} "
            f"(--num_shards={FLAGS.num_shards})."
        )
    configs = []
    for point in grid:
        try:  # the point's own axes and a group's overrides win over the common settings
            overrides = {**common_overrides(point), **collect.overrides_of(point)}
            configs.append(config_lib.make_config(FLAGS.preset, **overrides))
        except ValueError as e:  # config validation: names the value and the accepted ones
            raise errors.UsageError(f"grid point {collect.run_name(point)}: {e}") from None
    return configs


def read_records(path: str | None) -> dict[str, dict]:
    """:func:`cem_jax.cli.collect.read_records` of ``path`` (``{}`` for none); a damaged file is an
    :class:`cem_jax.errors.InputError` naming ``--records``."""
    if not path:
        return {}
    try:
        return collect.read_records(path)
    except errors.InputError as e:
        raise errors.InputError(f"--records: {e}") from None


def records_path() -> str | None:
    """``--records`` when given (``--records=``: none), else the study's ``records``."""
    if FLAGS["records"].present:
        return FLAGS.records or None
    return _STUDY.get("records") or None


def collect_all(grid: list[dict]) -> None:
    """Writes table.md, table.json and privacy_utility.png under ``--root``.

    With a records file, finished workdirs are added to it first (the runs of every shard), and runs
    whose workdir is gone are collected from it.
    """
    path = records_path()
    recorded: dict[str, dict] = {}
    if path:
        finished = collect.load_runs((p, workdir_of(p)) for p in grid)
        read_records(path)  # a damaged file is refused before anything is added to it
        added = collect.add_records(path, {collect.run_name(p): r for p, r in finished})
        recorded = read_records(path)
        print(f"{path}: {len(recorded)} runs recorded ({added} added or updated now)")
    runs = collect.load_runs(((p, workdir_of(p)) for p in grid), recorded)
    records = collect.summarize(runs)  # InputError: runs of one point that cannot be pooled
    meta = {
        "dataset": FLAGS.dataset,
        "preset": FLAGS.preset,
        "study": FLAGS.study,
        "records": path,
        "finished": len(runs),
        "runs": len(grid),
        "scale": collect.scale(runs[0][1]) if runs else None,
    }
    text = collect.write_table(FLAGS.root, records, meta)
    print(f"\n{len(runs)}/{len(grid)} runs finished ({len(records)} grid points)\n{text}")
    print(f"\nwrote {storage.join(FLAGS.root, collect.TABLE_MD)} and {collect.TABLE_JSON}")
    png = storage.join(FLAGS.root, collect.PLOT_PNG)
    try:
        drawn = collect.plot_privacy_utility(
            records, png, title=f"{FLAGS.dataset}, preset {FLAGS.preset}"
        )
    except ImportError:
        print(f"{collect.PLOT_PNG} not drawn: matplotlib is missing (pip install -e .[plots])")
    else:
        print(f"wrote {png}" if drawn else f"{collect.PLOT_PNG} not drawn: no finished run yet")


def progress_line(done: int, total: int, run_seconds: list[float]) -> str:
    """``sweep: 25 of 90 runs finished, 65 to run, ETA 19:30:00 (18:00 per run, mean of 2 here)``.

    ``run_seconds``: wall times of the runs trained in this process (a resumed run counts what it
    took now); the ETA assumes the runs left take their mean.
    """
    if done >= total:
        return f"sweep: {done} of {total} runs finished"
    line = f"sweep: {done} of {total} runs finished, {total - done} to run"
    if run_seconds:
        per = statistics.mean(run_seconds)
        line += (
            f", ETA {format_duration(per * (total - done))} ({format_duration(per)} per run, "
            f"mean of {len(run_seconds)} here)"
        )
    return line


def _main(argv: list[str]) -> None:
    # expected failures (cem_jax.errors.CemError) end in one "error:" line: config_flags.run_main
    config_flags.check_no_arguments(argv)
    grid = points()
    configs = check_grid(grid)
    from cem_jax import parallel, runner

    config_flags.initialize_distributed_from_flags(FLAGS)  # before any device is touched
    if FLAGS.collect_only:
        if parallel.is_main_process():  # one writer of the table and the plot
            collect_all(grid)
        return

    path = records_path()
    recorded = read_records(path)
    # shards write no records (one file, many writers): --collect_only adds theirs afterwards
    record_here = path and FLAGS.num_shards == 1 and parallel.is_main_process()
    mine = list(zip(grid, configs))[FLAGS.shard_index :: FLAGS.num_shards]
    finished = {
        collect.run_name(p)
        for p, _ in mine
        if collect.run_name(p) in recorded
        or storage.exists(storage.join(workdir_of(p), collect.RESULTS_FILE))
    }
    print(progress_line(len(finished), len(mine), []), flush=True)
    run_seconds: list[float] = []  # wall time of the runs this process trained, for the ETA
    for i, (point, cfg) in enumerate(mine):
        name, workdir = collect.run_name(point), workdir_of(point)
        rec = recorded.get(name)
        if rec is not None and not storage.exists(storage.join(workdir, collect.RESULTS_FILE)):
            problem = collect.record_mismatch(
                rec, cfg.training_fingerprint(), runner.attack_config(cfg)
            )
            if problem:
                config_flags.fail(
                    f"{path} records it with another configuration ({problem}). "
                    "Repeat the recorded settings, or remove its line to run it again.",
                    at=name,
                )
            print(
                f"\n### sweep run {i + 1}/{len(mine)}: {name}: finished (commit "
                f"{str(rec.get('commit'))[:12]}), recorded in {path}; skipped",
                flush=True,
            )
            continue
        print(f"\n### sweep run {i + 1}/{len(mine)}: {name}", flush=True)
        start, was_finished = time.perf_counter(), name in finished
        try:
            results = runner.run(
                cfg,
                workdir=workdir,
                cache_dir=FLAGS.cache_dir or None,
                num_devices=FLAGS.num_devices,
                device_index=FLAGS.device_index,
            )
        except errors.CemError as e:  # the run's expected failure, named
            config_flags.fail(str(e), e.exit_code, at=name)
        if record_here and collect.add_records(path, {name: results}):
            print(f"recorded {name} in {path}", flush=True)
        if not was_finished:
            run_seconds.append(time.perf_counter() - start)
            finished.add(name)
            print(progress_line(len(finished), len(mine), run_seconds), flush=True)
    if not parallel.is_main_process():
        return
    print(
        f"\nshard {FLAGS.shard_index}/{FLAGS.num_shards}: {len(mine)} runs done. When every shard "
        "has finished, the same command with --collect_only writes the table and the plot."
    )


def main() -> None:
    """Console script ``cem-sweep`` (and ``python -m experiments.sweep``)."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
