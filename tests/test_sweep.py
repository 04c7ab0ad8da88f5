"""experiments.sweep: seeds, clear errors for bad axes, the collected table (mean ± std, n) and the plot."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cem_jax import config as config_lib
from cem_jax import defenses
from cem_jax.cli import collect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_ARGS = [
    "--defenses=none,noise,cem_noise",
    "--sigmas=0.05,0.1",
    "--lambdas=1",
    "--seeds=1,2,3",
    "--preset=quick",
    "--dataset=synthetic",
]


def _python(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python <argv>`` in the repository root, on the CPU, output captured."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def run_sweep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _python("-m", "experiments.sweep", *args, timeout=timeout)


def test_grid_has_one_run_per_point_and_seed():
    pts = collect.grid(["none", "noise", "cem_noise"], [0.05, 0.1], [1.0, 2.0], [1, 2, 3])
    # none: no σ axis; noise: 2 σ; cem_noise: 2 σ × 2 λ; each × 3 seeds
    assert len(pts) == (1 + 2 + 4) * 3
    names = [collect.run_name(p) for p in pts]
    assert len(set(names)) == len(names)
    assert "cem_noise_s0.05_l2_seed3" in names and "none_seed1" in names
    # without seeds the workdirs are those of a seedless sweep (resuming an older sweep still works)
    assert [collect.run_name(p) for p in collect.grid(["noise"], [0.1])] == ["noise_s0.1"]
    # repeated values are one axis point
    assert len(collect.grid(["noise", "noise"], [0.1, 0.1], seeds=[1, 1])) == 1


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--sigmas=abc", "--sigmas=abc: 'abc' is not a number"),
        ("--lambdas=1,x", "'x' is not a number"),
        ("--seeds=1.5", "'1.5' is not an integer"),
        ("--sigmas=inf", "'inf' is not a number"),
        ("--lambdas=-1", "grid point cem_noise_s0.05_l-1_seed1: lambd=-1.0"),
        ("--sigmas=0", "CEM needs Gaussian noise"),
        ("--defenses=cem_nosie", "did you mean 'cem_noise'"),
        ("--shard_index=3", "shard_index=3: accepted 0..0"),
    ],
)
def test_bad_sweep_values_are_clear_errors(arg, message, tmp_path):
    args = [a for a in GRID_ARGS if not a.startswith(arg.split("=")[0] + "=")]
    proc = run_sweep(*args, arg, f"--root={tmp_path}", "--collect_only")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "table.md").exists()


def test_sweep_runs_every_seed_in_its_own_workdir_split_over_shards(tmp_path):
    """The run loop, with runner.run replaced by a recorder (no training)."""
    driver = (
        "import sys\n"
        "from cem_jax import runner\n"
        "calls, devs = [], []\n"
        "runner.run = lambda cfg, workdir, cache_dir=None, num_devices=None, device_index=None: ("
        "calls.append((cfg.defense, cfg.sigma, cfg.lambd, cfg.seed, cfg.epochs, workdir)), "
        "devs.append(device_index))\n"
        "from experiments import sweep\n"
        "sys.argv = ['sweep', *sys.argv[1:]]\n"
        "try:\n"
        "    sweep.main()\n"
        "finally:\n"
        "    print(repr(devs))\n"
        "    print(repr(calls))\n"
    )
    shards = []
    for index in (0, 1):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                driver,
                *GRID_ARGS,
                "--epochs=2",
                f"--root={tmp_path}",
                "--num_shards=2",
                f"--shard_index={index}",
                *(["--device_index=0"] if index else []),  # pins shard 1's runs
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        shards.append(ast.literal_eval(proc.stdout.strip().splitlines()[-1]))
        devs = ast.literal_eval(proc.stdout.strip().splitlines()[-2])
        assert devs == [0 if index else None] * len(shards[-1])
    calls = shards[0] + shards[1]
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    assert len(calls) == (1 + 2 + 2) * 3
    assert len({c[-1] for c in calls}) == len(calls)  # one workdir per run
    base = os.path.join(str(tmp_path), "synthetic_quick")
    assert ("cem_noise", 0.1, 1.0, 2, 2, os.path.join(base, "cem_noise_s0.1_l1_seed2")) in calls
    assert ("none", None, None, 3, 2, os.path.join(base, "none_seed3")) in calls
    assert {c[3] for c in calls} == {1, 2, 3}
    assert all(c[4] == 2 for c in calls)  # --epochs reaches every run
    assert not (tmp_path / "table.md").exists()  # only --collect_only writes the table


def _fake_results(defense, sigma, lambd, seed, rng, *, flagged=False, attacks=True) -> dict:
    cfg = config_lib.make_config(
        "quick", dataset="synthetic", defense=defense, sigma=sigma, lambd=lambd, seed=seed
    )
    entry = lambda: {
        "mse": float(rng.uniform(0.01, 0.08)),
        "psnr": float(rng.uniform(10, 25)),
        "ssim": float(rng.uniform(0.1, 0.9)),
        "steps": 300,
        "converged": not flagged,
        "informative": True,
        "baseline": {"mse": 0.065, "psnr": 11.9, "ssim": 0.05},
    }
    res = {
        "status": "finished",
        "config": cfg.to_dict(),
        "final": {
            "clean_acc": float(rng.uniform(0.3, 0.6)),
            "defended_acc": float(rng.uniform(0.2, 0.5)),
            "leakage_bits": float(rng.uniform(100, 900)),
            "leakage": {"sigma": sigma, "certificate_bits": 0.0},
        },
        "attacks": {},
    }
    if attacks:
        res["attacks"] = {"decoder": {"train_time": entry(), "inference_time": entry()}}
    return res


def test_collect_gives_mean_std_n_per_grid_point_and_draws_the_plot(tmp_path):
    rng = np.random.default_rng(0)
    written: dict[str, list[dict]] = {}
    for point in collect.grid(["none", "noise", "cem_noise"], [0.05, 0.1], [1.0], [1, 2, 3]):
        name = collect.point_name(point)
        if name == "noise_s0.05" and point["seed"] == 3:
            continue  # an unfinished run: n = 2 for that point
        if name == "none" and point["seed"] != 1:
            continue  # n = 1: no standard deviation
        res = _fake_results(
            point["defense"],
            point["sigma"],
            point["lambd"],
            point["seed"],
            rng,
            flagged=name == "cem_noise_s0.1_l1" and point["seed"] == 2,
            attacks=name != "none",
        )
        wd = collect.workdir_of(str(tmp_path), "synthetic", "quick", point)
        os.makedirs(wd)
        with open(os.path.join(wd, collect.RESULTS_FILE), "w") as f:
            json.dump(res, f)
        written.setdefault(name, []).append(res)

    proc = run_sweep(*GRID_ARGS, f"--root={tmp_path}", "--collect_only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12/15 runs finished (5 grid points)" in proc.stdout

    table = json.loads((tmp_path / "table.json").read_text())
    assert table["finished"] == 12 and table["runs"] == 15
    rows = {r["name"]: r for r in table["rows"]}
    assert set(rows) == set(written)
    for name, results in written.items():
        row = rows[name]
        assert row["n"] == len(results)
        for key, get in (
            ("defended_acc", lambda r: r["final"]["defended_acc"]),
            ("leakage_bits", lambda r: r["final"]["leakage_bits"]),
            ("decoder.train_time.mse", lambda r: r["attacks"]["decoder"]["train_time"]["mse"]),
        ):
            if name == "none" and key.startswith("decoder"):
                assert key not in row["metrics"]
                continue
            values = np.array([get(r) for r in results])
            m = row["metrics"][key]
            assert m["n"] == len(values)
            np.testing.assert_allclose(m["mean"], values.mean(), rtol=1e-12)
            if len(values) > 1:
                np.testing.assert_allclose(m["std"], values.std(ddof=1), rtol=1e-12)
            else:
                assert m["std"] is None
    assert rows["noise_s0.1"]["sigma"] == 0.1 and rows["noise_s0.1"]["lambd"] is None
    assert rows["cem_noise_s0.05_l1"]["lambd"] == 1.0
    # a CEM point names the loss and λ schedule its runs trained with; other points have none
    defaults = config_lib.RunConfig()
    assert rows["cem_noise_s0.05_l1"]["cem_loss"] == {
        "mode": defaults.cem_mode,
        "schedule": defaults.lambda_schedule,
    }
    assert "cem_loss" not in rows["noise_s0.1"]
    res = _fake_results("cem_noise", 0.1, 3.0, 1, rng)
    res["config"].update(cem_mode="gmm", lambda_schedule="constant")
    (row,) = collect.summarize([({"defense": "cem_noise", "lambd": 3.0, "seed": 1}, res)])
    assert row["cem_loss"] == {"mode": "gmm", "schedule": "constant"} and row["lambd"] == 3.0
    assert [r["seed"] for r in rows["noise_s0.05"]["runs"]] == [1, 2]
    assert rows["cem_noise_s0.1_l1"]["metrics"]["decoder.train_time.mse"]["flagged"] == 1
    assert rows["noise_s0.1"]["metrics"]["decoder.train_time.mse"]["flagged"] == 0

    md = (tmp_path / "table.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| noise | 0.1 |"))
    acc = np.array([r["final"]["defended_acc"] for r in written["noise_s0.1"]])
    assert f"{acc.mean():.4f} ± {acc.std(ddof=1):.4f}" in line
    assert "| 3 |" in line
    flagged_line = next(ln for ln in md.splitlines() if ln.startswith("| cem_noise | 0.1 |"))
    assert "†" in flagged_line and "†" not in line
    assert "† at least one seed's attack did not converge" in md

    png = tmp_path / collect.PLOT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 300


def test_collect_tolerates_results_without_attacks_or_new_keys(tmp_path):
    rng = np.random.default_rng(1)
    old = _fake_results("noise", 0.1, None, 1, rng, attacks=False)
    del old["final"]["leakage_bits"]
    new = _fake_results("noise", 0.1, None, 2, rng)
    new["attacks"]["decoder"]["train_time"]["informative"] = False
    new["attacks"]["whitebox"] = {"train_time": {"mse": float("nan"), "note": "skipped"}}
    new["attacks"]["gan"] = {"train_time": None}
    records = collect.summarize([({"defense": "noise", "sigma": 0.1}, r) for r in (old, new)])
    (rec,) = records
    assert rec["n"] == 2 and rec["metrics"]["leakage_bits"]["n"] == 1
    assert rec["metrics"]["decoder.train_time.mse"]["flagged"] == 1
    assert "whitebox.train_time.mse" not in rec["metrics"]  # NaN is no number
    md = collect.table_markdown(records)
    assert "(n=1)" in md and "†" in md
    assert "GAN train-time MSE" not in md and "decoder train-time MSE" in md  # no empty columns
    assert collect.plot_privacy_utility(records, str(tmp_path / "p.png"))
    # the results page's straight line through the noise runs, drawn on the MSE panel
    assert collect.plot_privacy_utility(
        records, str(tmp_path / "l.png"), line=(0.06, -0.1, 0.2, 0.4)
    )
    assert (tmp_path / "l.png").read_bytes() != (tmp_path / "p.png").read_bytes()
    assert not collect.plot_privacy_utility([], str(tmp_path / "q.png"))
    assert not (tmp_path / "q.png").exists()
    # results.json of an older version: the full-covariance estimate, no certificate
    for r in (old, new):
        r["final"]["leakage_bits_full"] = r["final"].pop("leakage_bits", 500.0)
    records = collect.summarize([({"defense": "noise", "sigma": 0.1}, r) for r in (old, new)])
    assert records[0]["metrics"]["leakage_bits_full"]["n"] == 2
    assert "full-cov. estimate" in collect.table_markdown(records)
    assert collect.plot_privacy_utility(records, str(tmp_path / "old.png"))


# runner.run replaced by a fake that writes a results.json (no training) and says which run it ran
RECORDING_DRIVER = """
import json, os, sys
from cem_jax import runner

def fake_run(cfg, workdir, cache_dir=None, num_devices=None, device_index=None):
    os.makedirs(workdir, exist_ok=True)
    res = {
        "status": "finished", "commit": "c0ffee", "config": cfg.to_dict(),
        "fingerprint": cfg.training_fingerprint(), "attack_config": runner.attack_config(cfg),
        "dataset": {"name": "synthetic", "num_train": 64, "num_test": 32, "class_names": ["a"]},
        "devices": "1 x cpu", "wall_time_s": 60.0 + cfg.seed, "history": [{"epoch": 1}],
        "final": {"clean_acc": 0.5, "defended_acc": 0.3 + 0.01 * cfg.seed,
                  "leakage_bits": 100.0 * cfg.seed + (cfg.sigma or 0)},
        "attacks": {"decoder": {"train_time": {
            "mse": 0.02 + 0.001 * cfg.seed, "psnr": 17.0, "ssim": 0.4, "converged": True,
            "informative": True, "baseline": {"mse": 0.06}}}},
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(res, f)
    print("RAN", os.path.basename(workdir))
    return res

runner.run = fake_run
from experiments import sweep
sys.argv = ["sweep", *sys.argv[1:]]
sweep.main()
"""


def _recording_sweep(*args: str) -> subprocess.CompletedProcess:
    return _python("-c", RECORDING_DRIVER, *args)


def test_progress_line_counts_and_estimates_the_runs_left():
    from cem_jax.cli.sweep import progress_line

    assert progress_line(23, 90, []) == "sweep: 23 of 90 runs finished, 67 to run"
    assert progress_line(25, 90, [1000.0, 1160.0]) == (
        "sweep: 25 of 90 runs finished, 65 to run, ETA 19:30:00 (18:00 per run, mean of 2 here)"
    )
    assert progress_line(90, 90, [60.0]) == "sweep: 90 of 90 runs finished"


def test_records_carry_a_sweep_to_a_fresh_machine(tmp_path):
    """A sweep records every finished run; on a fresh root (another machine: no workdirs) the same
    sweep skips the recorded runs, --collect_only rebuilds the same table from the records, and the
    results page regenerates from it."""
    from cem_jax.cli import results_page

    records = tmp_path / "repo" / "runs.jsonl"
    args = [
        "--defenses=noise,cem_noise",
        "--sigmas=0.1,0.2",
        "--seeds=1,2",
        "--preset=quick",
        "--dataset=synthetic",
        "--epochs=2",
        f"--records={records}",
    ]
    first = _recording_sweep(*args, f"--root={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("RAN ") == 8
    # study-level progress: the start, then one line per run with an ETA from this process's runs
    assert "sweep: 0 of 8 runs finished, 8 to run\n" in first.stdout
    assert re.search(
        r"sweep: 1 of 8 runs finished, 7 to run, ETA \S+ \(\S+ per run, mean of 1 ", first.stdout
    )
    assert "sweep: 7 of 8 runs finished, 1 to run, ETA" in first.stdout
    assert first.stdout.rstrip().count("sweep: 8 of 8 runs finished") == 1
    lines = records.read_text().splitlines()
    names = [json.loads(line)["run"] for line in lines]
    assert names == sorted(names) and len(names) == 8 and "cem_noise_s0.2_seed2" in names
    rec = json.loads(lines[names.index("noise_s0.1_seed2")])
    assert rec["final"]["defended_acc"] == pytest.approx(0.32) and rec["commit"] == "c0ffee"
    assert "history" not in rec and "class_names" not in rec["dataset"]  # kept small
    assert rec["attacks"]["decoder"]["train_time"]["mse"] == pytest.approx(0.022)

    fresh = _recording_sweep(*args, f"--root={tmp_path / 'b'}")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "RAN " not in fresh.stdout  # every run is recorded: nothing trains again
    assert fresh.stdout.count(f"recorded in {records}; skipped") == 8
    assert "sweep: 8 of 8 runs finished" in fresh.stdout and "to run" not in fresh.stdout
    assert not (tmp_path / "b" / "synthetic_quick").exists()

    tables = {}
    for root in ("a", "b"):
        proc = _recording_sweep(*args, f"--root={tmp_path / root}", "--collect_only")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "8/8 runs finished (4 grid points)" in proc.stdout
        assert f"{records}: 8 runs recorded (0 added or updated now)" in proc.stdout
        tables[root] = json.loads((tmp_path / root / "table.json").read_text())
    for ra, rb in zip(tables["a"]["rows"], tables["b"]["rows"], strict=True):
        assert ra["name"] == rb["name"] and ra["metrics"] == rb["metrics"]
        assert [r["commit"] for r in rb["runs"]] == ["c0ffee", "c0ffee"]
    meta = tables["b"]
    assert meta["records"] == str(records) and meta["scale"]["dataset"]["num_train"] == 64
    assert meta["scale"]["config"]["epochs"] == 2
    (row,) = [r for r in meta["rows"] if r["name"] == "noise_s0.2"]
    assert row["metrics"]["leakage_bits"]["values"] == pytest.approx([100.2, 200.2])

    page = results_page.write_page(str(tmp_path / "b"), str(tmp_path / "docs" / "results.md"))
    assert f"Every finished run is recorded in `{records}`" in page
    assert "- Compute: 8 runs, 0.1 h of wall time in all, 1.0 min per run" in page

    # a recorded run of another configuration is refused, not silently reused or replaced
    other = [a for a in args if a != "--epochs=2"] + ["--epochs=3"]
    proc = _recording_sweep(*other, f"--root={tmp_path / 'c'}")
    assert proc.returncode != 0 and "RAN " not in proc.stdout
    assert "records it with another configuration (training epochs: 2 recorded vs 3 now)" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr

    # a damaged records file is a clear error naming its line
    records.write_text(records.read_text() + "{not json\n")
    proc = _recording_sweep(*args, f"--root={tmp_path / 'd'}")
    assert proc.returncode != 0 and "RAN " not in proc.stdout
    assert f"--records: {records}:9: not a JSON line" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shards_leave_records_to_collect_only(tmp_path):
    """One records file, many shard processes: the shards write none; --collect_only adds them."""
    records = tmp_path / "runs.jsonl"
    args = ["--defenses=noise", "--sigmas=0.1", "--seeds=1,2,3", "--preset=quick"]
    args += ["--dataset=synthetic", f"--records={records}", f"--root={tmp_path / 'root'}"]
    for index in (0, 1):
        proc = _recording_sweep(*args, "--num_shards=2", f"--shard_index={index}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert not records.exists()
    proc = _recording_sweep(*args, "--collect_only")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{records}: 3 runs recorded (3 added or updated now)" in proc.stdout
    assert len(collect.read_records(str(records))) == 3
    # recording the same results again changes nothing (the file is not rewritten)
    stamp = records.stat().st_mtime_ns
    finished = collect.load_runs(
        (p, collect.workdir_of(str(tmp_path / "root"), "synthetic", "quick", p))
        for p in collect.grid(["noise"], [0.1], seeds=[1, 2, 3])
    )
    assert collect.add_records(str(records), {collect.run_name(p): r for p, r in finished}) == 0
    assert records.stat().st_mtime_ns == stamp


def test_a_study_pins_what_the_defaults_decide_and_keeps_its_records(tmp_path):
    """``common`` and ``cem_common`` pin settings (a group's overrides and λ axis win over both);
    runs recorded before the pin, with the same resolved values, still count as the same runs."""
    records = tmp_path / "runs.jsonl"
    spec = tmp_path / "study.json"
    study = {
        "preset": "quick",
        "dataset": "synthetic",
        "records": str(records),
        "common": {"epochs": 2},
        "groups": [
            {"defenses": ["noise", "cem_noise"], "sigmas": [0.1], "seeds": [1]},
            {
                "variant": "reference",
                "defenses": ["cem_noise"],
                "sigmas": [0.1],
                "lambdas": [3],
                "seeds": [1],
                "overrides": {"cem_mode": "reference"},
            },
        ],
    }
    spec.write_text(json.dumps(study))
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'a'}")
    assert proc.returncode == 0 and proc.stdout.count("RAN ") == 3, proc.stderr[-2000:]
    # now pinned: the same values the runs had from the defaults
    defaults = config_lib.RunConfig()
    study["common"].update(cem_mode=defaults.cem_mode, lambda_schedule=defaults.lambda_schedule)
    study["cem_common"] = {"lambd": defenses.DEFAULT_LAMBDA}
    spec.write_text(json.dumps(study))
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'b'}")
    assert proc.returncode == 0 and "RAN " not in proc.stdout, proc.stderr[-2000:]
    assert proc.stdout.count("; skipped") == 3
    # pinned to other values, the recorded runs are refused with the difference named
    study["cem_common"] = {"lambd": 2.0}
    spec.write_text(json.dumps(study))
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'c'}")
    assert proc.returncode != 0 and "RAN " not in proc.stdout
    assert (
        "records it with another configuration (training resolved_defense.lambd: "
        f"{defenses.DEFAULT_LAMBDA} recorded vs 2.0 now)"
    ) in proc.stderr
    # the pins reach the runs: a fresh study with them records the pinned and overridden values
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'd'}", "--records=")
    assert proc.returncode == 0 and proc.stdout.count("RAN ") == 3, proc.stderr[-2000:]
    done = {
        p.parent.name: json.loads(p.read_text())["config"]
        for p in (tmp_path / "d").rglob("results.json")
    }
    assert done["cem_noise_s0.1_seed1"]["lambd"] == 2.0
    assert done["noise_s0.1_seed1"]["lambd"] is None  # cem_common reaches CEM runs only
    ref = done["cem_noise_s0.1_l3_reference_seed1"]
    assert (ref["lambd"], ref["cem_mode"], ref["epochs"]) == (3, "reference", 2)


def test_a_study_names_its_records_and_records_empty_turns_them_off(tmp_path):
    records = tmp_path / "study_runs.jsonl"
    spec = tmp_path / "study.json"
    spec.write_text(
        json.dumps(
            {
                "preset": "quick",
                "dataset": "synthetic",
                "records": str(records),
                "groups": [{"defenses": ["noise"], "sigmas": [0.1], "seeds": [1, 2]}],
            }
        )
    )
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("RAN ") == 2 and len(collect.read_records(str(records))) == 2
    # the study's records make a fresh root skip both runs; --records= runs them again, unrecorded
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'b'}")
    assert proc.returncode == 0 and "RAN " not in proc.stdout, proc.stderr[-2000:]
    before = records.read_text()
    proc = _recording_sweep(f"--study={spec}", f"--root={tmp_path / 'c'}", "--records=")
    assert proc.returncode == 0 and proc.stdout.count("RAN ") == 2, proc.stderr[-2000:]
    assert records.read_text() == before


def test_records_made_under_another_defense_preset_are_told_apart(monkeypatch):
    from cem_jax import runner

    rng = np.random.default_rng(2)
    cfg = config_lib.make_config("quick", dataset="synthetic", defense="cem_noise", seed=1)
    res = _fake_results("cem_noise", None, None, 1, rng)
    res["fingerprint"] = cfg.training_fingerprint()
    res["attack_config"] = runner.attack_config(cfg)
    rec = collect.run_record("cem_noise_seed1", res)
    assert collect.record_mismatch(rec, cfg.training_fingerprint(), runner.attack_config(cfg)) == ""
    (row,) = collect.summarize([({"defense": "cem_noise", "seed": 1}, res)])
    assert (row["sigma"], row["lambd"]) == (0.1, defenses.DEFAULT_LAMBDA)
    # the cem_* presets' λ changes: the same config no longer matches the record, and says why
    cem = {**defenses.DEFENSES["cem_noise"], "lambd": 3.0}
    monkeypatch.setitem(defenses.DEFENSES, "cem_noise", cem)
    problem = collect.record_mismatch(rec, cfg.training_fingerprint(), runner.attack_config(cfg))
    assert (
        problem == f"training resolved_defense.lambd: {defenses.DEFAULT_LAMBDA} recorded vs 3.0 now"
    )
    # the table reads σ and λ from what the run recorded, not from today's preset
    (row,) = collect.summarize([({"defense": "cem_noise", "seed": 1}, res)])
    assert row["lambd"] == defenses.DEFAULT_LAMBDA
    # a seed run after the change is not pooled with one run before it
    later = _fake_results("cem_noise", None, None, 2, rng)
    later["fingerprint"] = config_lib.make_config(
        "quick", dataset="synthetic", defense="cem_noise", seed=2
    ).training_fingerprint()
    point = {"defense": "cem_noise"}
    with pytest.raises(ValueError, match="cem_noise holds runs trained with different defenses"):
        collect.summarize([({**point, "seed": 1}, res), ({**point, "seed": 2}, later)])
    # runs recorded before the fingerprint held the defense are pooled as before
    old = {**later, "fingerprint": {}}
    assert (
        collect.summarize([({**point, "seed": 1}, res), ({**point, "seed": 2}, old)])[0]["n"] == 2
    )


def test_summarize_records_each_value_s_seed_so_points_pair_by_seed():
    # seed 2's attack did not finish: its metric's values skip it, and "seeds" says which is which
    rng = np.random.default_rng(1)
    point = {"defense": "noise", "sigma": 0.1, "lambd": None}
    runs = [
        ({**point, "seed": s}, _fake_results("noise", 0.1, None, s, rng, attacks=s != 2))
        for s in (1, 2, 3)
    ]
    (row,) = collect.summarize(runs)
    acc, mse = row["metrics"]["defended_acc"], row["metrics"]["decoder.train_time.mse"]
    assert acc["seeds"] == [1, 2, 3] and mse["seeds"] == [1, 3]
    assert mse["values"] == [runs[0][1]["attacks"]["decoder"]["train_time"]["mse"],
                             runs[2][1]["attacks"]["decoder"]["train_time"]["mse"]]  # fmt: skip
    assert [r["seed"] for r in row["runs"]] == [1, 2, 3]


def test_full_cifar_study_spec_orders_its_pairs_and_pins_the_default_loss():
    """experiments/studies/full_cifar10.json (issue 36): none x 3 seeds, noise at 3 σ and cem_noise
    at 2 σ x 3 seeds each, at the cifar_full preset; ordered so that a study stopped part way has
    the undefended check, the first pair, seed 1's whole noise line, then the σ 0.1 pairs of all
    3 seeds (the paper's comparison at equal σ, and point 4's decision), then point 4's weaker
    CEM setting (λ 0.1, 3 seeds), then the rest."""
    from cem_jax import runner

    spec = collect.load_study(os.path.join(ROOT, "experiments/studies/full_cifar10.json"))
    assert (spec["preset"], spec["dataset"]) == ("cifar_full", "cifar10")
    assert spec["records"] == "docs/results_full_runs.jsonl"  # its own, not the frontier's
    pts = spec["points"]
    order = [collect.run_name(p) for p in pts]
    assert len(set(order)) == len(order)  # every run has its own workdir
    # every point at >= 3 seeds: none; noise at 3 σ; cem_noise at 2 σ
    seeds: dict[str, set] = {}
    for p in pts:
        seeds.setdefault(collect.point_name(p), set()).add(p["seed"])
    assert seeds == {
        "none": {1, 2, 3},
        **{f"noise_s{s:g}": {1, 2, 3} for s in (0.1, 0.2, 0.4)},
        **{f"cem_noise_s{s:g}": {1, 2, 3} for s in (0.1, 0.2)},
        "cem_noise_s0.1_lambda0.1": {1, 2, 3},  # point 4's weaker setting, at 3 seeds
    }

    def pair(s, k):
        return [f"noise_s{s:g}_seed{k}", f"cem_noise_s{s:g}_seed{k}"]

    # the promised order: the undefended check, the first pair, the rest of seed 1; the σ 0.1
    # pairs of seeds 2 and 3; the weaker CEM setting (λ 0.1) at 3 seeds; seed 2's and seed 3's
    # σ 0.2 pair and σ 0.4; the other undefended seeds last. Each seed's noise / cem_noise at one
    # σ side by side.
    assert order == [
        "none_seed1",
        *pair(0.1, 1), *pair(0.2, 1), "noise_s0.4_seed1",
        *pair(0.1, 2), *pair(0.1, 3),
        *[f"cem_noise_s0.1_lambda0.1_seed{k}" for k in (1, 2, 3)],
        *pair(0.2, 2), "noise_s0.4_seed2",
        *pair(0.2, 3), "noise_s0.4_seed3",
        "none_seed2", "none_seed3",
    ]  # fmt: skip
    # every run validates at the preset; the CEM runs pin the default loss (reference hinge,
    # λ 0.32 x lr0/lr), every run attacks with the train-time decoder only
    for p in pts:
        overrides = {**collect.study_common(spec, p), **collect.overrides_of(p)}
        cfg = config_lib.make_config(spec["preset"], dataset=spec["dataset"], **overrides)
        assert cfg.train_subset is None and cfg.lr_schedule == "onecycle"
        assert cfg.attacks == ("decoder",) and cfg.attack_settings == ("train_time",)
        if p["defense"] == "cem_noise":
            d = cfg.defense_spec()
            # the weaker setting changes λ alone
            lambd = 0.1 if p.get("variant") == "lambda0.1" else 0.32
            assert (cfg.cem_mode, cfg.lambda_schedule) == ("reference", "inverse_lr")
            assert d.lambd == lambd
            assert p.get("variant") in (None, "lambda0.1") and d.sigma == p["sigma"]
        else:
            assert cfg.lambd is None  # cem_common reaches the CEM runs only
    # the pins are today's defaults: the study measures what a user's run trains
    defaults = config_lib.RunConfig()
    assert spec["common"]["cem_mode"] == defaults.cem_mode
    assert spec["common"]["lambda_schedule"] == defaults.lambda_schedule
    assert spec["cem_common"]["lambd"] == defenses.DEFAULT_LAMBDA
    # a committed records file holds only the study's runs, with the configuration it gives them
    by_name = {collect.run_name(p): p for p in pts}
    for name, rec in collect.read_records(os.path.join(ROOT, spec["records"])).items():
        assert name in by_name, f"{name} is recorded but not a run of the study"
        point = by_name[name]
        overrides = {**collect.study_common(spec, point), **collect.overrides_of(point)}
        cfg = config_lib.make_config(spec["preset"], dataset=spec["dataset"], **overrides)
        assert not collect.record_mismatch(
            rec, cfg.training_fingerprint(), runner.attack_config(cfg)
        ), name
