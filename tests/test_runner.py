"""End-to-end tests of experiments.run / experiments.attack as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small synthetic runs: 128 training images, batch 32, no attacks unless asked.
SMALL = [
    "--dataset=synthetic",
    "--train_subset=128",
    "--batch_size=32",
    "--epochs=2",
    "--attacks=",
    "--seed=5",
    "--cache_dir=",
]


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--defense=cem_nosie"], "did you mean 'cem_noise'"),
        (["--defense=cem_noise", "--sigma=0"], "CEM needs Gaussian noise"),
        (
            ["--dataset=imagenet21k"],
            "accepted: cifar10, cifar100, facescrub, tinyimagenet, synthetic",
        ),
        (["--arch=vgg16"], "vgg11_bn_sgm"),
        (["--dataset=synthetic", "--epochs=0"], "epochs=0"),
        (["--dataset=synthetic", "--attacks=decoder,diffusion"], "unknown attacks 'diffusion'"),
        (["--defense=cem_dropout", "--dropout_ratio=1.0"], "accepted 0 (off) or a ratio in (0, 1)"),
        (["--defense=nopeek", "--nopeek_alpha=-1"], "nopeek_alpha=-1.0: accepted a value >= 0"),
        (
            ["--defense=adversarial", "--ssim_threshold=1.5"],
            "ssim_threshold=1.5: accepted a value < 1",
        ),
        (["--defense=topk", "--topk_scope=layer"], "should be one of <sample|batch>"),
        # attack budgets and sizes: refused before any training starts
        (["--dataset=synthetic", "--attack_steps=0"], "attack_steps=0: an attack budget"),
        (["--dataset=synthetic", "--gan_steps=5"], "gan_steps=5: the GAN attack"),
        (["--dataset=synthetic", "--attack_val_fraction=1.5"], "attack_val_fraction=1.5"),
        (
            [
                "--dataset=synthetic",
                "--train_subset=128",
                "--attack_batch_size=256",
                "--cache_dir=",
            ],
            "leaves 115, fewer than one batch (256)",
        ),
        (["--dataset=synthetic", "--device_index=99"], "device_index=99: accepted 0..0"),
    ],
)
def test_bad_flags_fail_fast_with_clear_errors(args, message, tmp_path):
    proc = run_module("experiments.run", *args, f"--workdir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def test_every_defense_setting_has_a_flag():
    code = (
        "from experiments import run\n"
        "run.FLAGS(['x', '--defense=cem_topk', '--topk_scope=batch', '--adversarial_alpha=0.2',\n"
        "           '--ssim_threshold=0.4', '--dropout_ratio=0.1', '--dropout_rescale',\n"
        "           '--nopeek_alpha=0.05', '--topk_ratio=0.3', '--sigma=0.2', '--lambd=2'])\n"
        "print(repr(run.config_from_flags().defense_spec()))\n"
        "print(run.FLAGS['defense'].help)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec, help_text = proc.stdout.split("\n", 1)
    for expected in (
        "name='cem_topk'",
        "sigma=0.2",
        "dropout_ratio=0.1",
        "dropout_rescale=True",
        "topk_ratio=0.3",
        "topk_scope='batch'",
        "nopeek_alpha=0.05",
        "adversarial_alpha=0.2",
        "ssim_threshold=0.4",
        "cem=True",
        "lambd=2.0",
    ):
        assert expected in spec, spec
    # --help names every preset with its defaults
    for preset in __import__("cem_jax.defenses").defenses.DEFENSES:
        assert preset in help_text
    assert "adversarial (adversarial_alpha=0.3, ssim_threshold=0.5)" in help_text


def test_data_dir_with_wrong_layout_is_explained(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.png").write_bytes(b"")
    proc = run_module(
        "experiments.run",
        "--dataset=facescrub",
        f"--data_dir={tmp_path / 'data'}",
        f"--workdir={tmp_path / 'run'}",
        "--cache_dir=",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "train" in proc.stderr and "images" in proc.stderr, proc.stderr[-2000:]


def test_attack_on_a_workdir_without_a_finished_run(tmp_path):
    proc = run_module("experiments.attack", f"--workdir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert "no checkpoints/ folder" in proc.stderr, proc.stderr[-2000:]


def _final(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_numbers(tmp_path, small_full_run):
    full = small_full_run
    part = tmp_path / "part"
    p = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *SMALL, f"--workdir={part}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    first = part / "checkpoints" / "1"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert first.exists(), "the run never wrote its first checkpoint"
    p.send_signal(signal.SIGKILL)  # killed after its first checkpoint, before the end
    p.wait()
    assert not (part / "results.json").exists()

    proc = run_module("experiments.run", *SMALL, f"--workdir={part}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed after epoch 1" in proc.stdout
    a, b = _final(full), _final(part)
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for k, v in a["final"].items():
        if isinstance(v, float) and not k.endswith("_s"):  # every final number but timings
            assert b["final"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
    assert b["final"].keys() == a["final"].keys()
    assert b["history"][-1]["loss"] == pytest.approx(a["history"][-1]["loss"], rel=1e-4)

    # another configuration in the same workdir is refused, and nothing is overwritten
    before = sorted(os.listdir(part / "checkpoints"))
    proc = run_module("experiments.run", *SMALL, "--sigma=0.3", f"--workdir={part}")
    assert proc.returncode != 0
    assert "another configuration" in proc.stderr and "sigma" in proc.stderr
    assert sorted(os.listdir(part / "checkpoints")) == before


@pytest.mark.slow
def test_run_with_attacks_then_reattack_and_load_client(tmp_path):
    wd = tmp_path / "run"
    args = [a for a in SMALL if not a.startswith(("--attacks", "--epochs"))]
    proc = run_module(
        "experiments.run",
        *args,
        "--epochs=1",
        "--attacks=decoder,gan,whitebox",
        "--attack_steps=4",
        "--attack_eval_every=2",
        "--attack_batch_size=32",
        "--gan_steps=10",
        "--whitebox_steps=4",
        "--whitebox_images=8",
        "--test_subset=64",
        f"--workdir={wd}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _final(wd)
    for attack in ("decoder", "gan", "whitebox"):
        for setting in ("train_time", "inference_time"):
            m = res["attacks"][attack][setting]
            assert 0 <= m["mse"] <= 1 and np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
            assert m["wall_time_s"] > 0 and m["steps"] >= 1 and isinstance(m["converged"], bool)
            assert m["curve"] and m["curve"][-1]["step"] == m["steps"]
            base = m["baseline"]
            assert 0 < base["mse"] < 1
            assert m["informative"] == (m["mse"] <= 0.9 * base["mse"])
            np.testing.assert_allclose(m["gain_db"], m["psnr"] - base["psnr"], rtol=1e-6)
    assert res["attacks"]["gan"]["train_time"]["generator_steps"] == 1
    assert res["attacks"]["whitebox"]["train_time"]["num_images"] == 8
    # The budget was too small to converge: said so, in results.json and in the summary.
    assert res["attacks"]["decoder"]["train_time"]["converged"] is False
    assert "NOT converged" in proc.stdout
    leak = res["final"]["leakage"]
    assert res["final"]["leakage_bits"] == max(
        leak["train"]["certificate"], leak["test"]["certificate"]
    )
    for split in ("train", "test"):
        assert (
            leak[split]["certificate"]
            >= leak[split]["diagonal"]
            >= leak[split]["full_estimate"] - 1e-3
        )
    assert res["dataset"]["mean"] and res["dataset"]["std"]
    assert os.path.getsize(wd / "reconstructions.png") > 0
    assert "decoder" in proc.stdout and "PSNR" in proc.stdout and "baseline" in proc.stdout
    # the banner says how CEM trains: the default loss and its λ schedule
    from cem_jax import defenses

    lam = defenses.DEFAULT_LAMBDA
    assert f"defense cem_noise (sigma=0.1, lambda={lam} x lr0/lr, mode=reference)" in proc.stdout
    # the per-epoch figure is the plug-in estimate, not the certificate: it must not read as a bound
    epoch_lines = [
        ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ") and "test acc" in ln
    ]
    assert epoch_lines and all("leakage estimate" in ln and "<=" not in ln for ln in epoch_lines)

    # re-attack without retraining: decoder only
    proc = run_module(
        "experiments.attack",
        f"--workdir={wd}",
        "--attacks=decoder",
        "--attack_steps=2",
        "--attack_eval_every=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res2 = _final(wd)
    assert set(res2["attacks"]) == {"decoder"}
    assert res2["history"] == res["history"]

    # the trained client as a black box
    import cem_jax

    client = cem_jax.load_client(str(wd))
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    z1 = client(x, jax.random.key(0))
    z2 = client(x, jax.random.key(1))
    assert z1.shape == (4, *client.feature_shape) == (4, 8, 8, 8)
    clean = client.encode_clean(x)
    sigma = client.config.defense_spec().sigma
    assert np.std(np.asarray(z1 - clean)) == pytest.approx(sigma, rel=0.15)
    assert not np.allclose(z1, z2)


# ------------------------------------------------------------------------------------------------
# Issue 10: faults and bad input end with a clear error or a correct result, never lost data.


def test_lambd_that_overflows_float32_is_refused(tmp_path):
    proc = run_module("experiments.run", "--lambd=1e300", f"--workdir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert "lambd=1e+300: accepted 0 <= lambd <= 1e+06" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    from cem_jax import defenses

    with pytest.raises(ValueError, match="lambd=1e\\+07: accepted"):
        defenses.Defense(name="x", sigma=0.1, cem=True, lambd=1e7)
    assert defenses.Defense(name="x", sigma=0.1, cem=True, lambd=1e6).lambd == 1e6
    for field in ("sigma", "nopeek_alpha", "adversarial_alpha"):
        with pytest.raises(ValueError, match=f"{field}=1e\\+300: accepted 0 <= {field} <= 1e\\+06"):
            defenses.Defense(name="x", **{field: 1e300})


def test_planted_symlink_at_the_temp_name_is_not_written_through(tmp_path):
    from cem_jax import runner

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "results.json.tmp").symlink_to(victim)
    (tmp_path / ".results.json.tmp").symlink_to(victim)
    runner.write_json_atomic(str(tmp_path / "results.json"), {"a": np.float32(1.5)})
    assert victim.read_text() == "precious"
    assert not (tmp_path / "results.json").is_symlink()
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1.5}
    assert sorted(os.listdir(tmp_path)) == [
        ".results.json.tmp",
        "results.json",
        "results.json.tmp",
        "victim.txt",
    ]  # no temporary file of ours left behind
    assert oct(os.stat(tmp_path / "results.json").st_mode & 0o777) == "0o644"


def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    import socket

    from cem_jax import runner

    wd = tmp_path / "run"
    with runner.lock_workdir(str(wd)) as me:
        # the same process cannot take it twice either (flock is per open file)
        with pytest.raises(runner.RunError, match=f"in use by another run: pid {os.getpid()}"):
            with runner.lock_workdir(str(wd)):
                pass
        proc = run_module("experiments.run", *SMALL, f"--workdir={wd}", timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert f"is in use by another run: pid {os.getpid()} on host {socket.gethostname()}" in err, err
    assert f"started {me['started']}" in err and "Traceback" not in err
    assert sorted(os.listdir(wd)) == [".lock"]  # it wrote nothing
    assert (wd / ".lock").read_text() == ""  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import io

    from cem_jax import runner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": dead.pid, "host": "gone", "started": "2020-01-01T00:00:00+00:00"})
    )
    buf = io.StringIO()
    with runner.lock_workdir(str(tmp_path), stream=buf) as me:
        assert me["pid"] == os.getpid()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of {tmp_path} from pid {dead.pid} on host gone" in (
        buf.getvalue()
    )


def _foreign_outputs(wd) -> dict[str, bytes]:
    wd.mkdir(parents=True, exist_ok=True)
    other = {"fingerprint": {"sigma": 0.3, "epochs": 9}, "final": {"clean_acc": 0.9}}
    (wd / "results.json").write_text(json.dumps(other))
    (wd / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    return {n: (wd / n).read_bytes() for n in ("results.json", "metrics.jsonl")}


def test_workdir_without_checkpoints_keeps_another_runs_outputs(tmp_path):
    wd = tmp_path / "run"
    before = _foreign_outputs(wd)  # another configuration's finished run, checkpoints/ deleted
    proc = run_module("experiments.run", *SMALL, f"--workdir={wd}", timeout=120)
    assert proc.returncode != 0
    assert "holds the results of another configuration" in proc.stderr, proc.stderr[-2000:]
    assert "no checkpoint (deleted?)" in proc.stderr and "epochs: 9 there vs 2" in proc.stderr
    assert {n: (wd / n).read_bytes() for n in before} == before
    assert not (wd / "checkpoints").exists()

    # only a metrics.jsonl (its results and checkpoints deleted): not mixed with a new run
    from cem_jax import config, runner

    (wd / "results.json").unlink()
    cfg = config.make_config("paper", dataset="synthetic", epochs=2, attacks=())
    with pytest.raises(runner.RunError, match=r"metrics.jsonl holds 2 epoch line\(s\) .* no "):
        runner.run(cfg, workdir=str(wd))
    assert (wd / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]


def _png_folder(root, classes: list[str], seed: int, per_class: int = 4):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _folder_config(data_dir, epochs: int = 2):
    from cem_jax import config

    return config.make_config(
        "paper",
        dataset="facescrub",
        data_dir=str(data_dir),
        epochs=epochs,
        batch_size=4,
        attacks=(),
    )


def _save_checkpoint(workdir, cfg, epoch: int) -> dict:
    from cem_jax import data, runner, train
    from cem_jax.checkpoint import Checkpointer

    ds = runner.load_data(cfg)
    trainer = train.Trainer(cfg, ds)
    identity = data.dataset_identity(ds)
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    hist = [{"epoch": e} for e in range(1, epoch + 1)]
    ckpt.save(
        epoch, trainer.init_state(), train.checkpoint_meta(cfg, trainer, epoch, hist, identity)
    )
    ckpt.close()
    return identity


def test_resume_finished_run_and_attack_on_other_data_are_refused(tmp_path):
    from cem_jax import runner

    a = _png_folder(tmp_path / "faces_a", ["ann", "bob"], seed=1)
    b = _png_folder(tmp_path / "faces_b", ["ann", "bob", "cyd"], seed=2)  # one class more
    c = _png_folder(tmp_path / "faces_c", ["ann", "bob"], seed=3)  # same classes, other pixels

    # a run killed after epoch 1 on A, resumed with --data_dir=B: named, not orbax's strict=False
    wd = tmp_path / "run"
    ident_a = _save_checkpoint(wd, _folder_config(a), epoch=1)
    with pytest.raises(runner.RunError) as e:
        runner.run(_folder_config(b), workdir=str(wd))
    msg = str(e.value)
    assert "was computed on dataset 'facescrub' from" in msg and str(a) in msg and str(b) in msg
    assert "2 classes" in msg and "3 classes" in msg and "differ in digest, class_names" in msg
    assert "strict" not in msg
    assert sorted(os.listdir(wd / "checkpoints")) == ["1"]

    # a finished workdir (results.json) rerun with other data of the same shape: refused, not reused
    cfg_a = _folder_config(a)
    wd2 = tmp_path / "finished"
    wd2.mkdir()
    previous = {
        "fingerprint": cfg_a.training_fingerprint(),
        "attack_config": runner.attack_config(cfg_a),
        "dataset": ident_a,
    }
    (wd2 / "results.json").write_text(json.dumps(previous))
    with pytest.raises(
        runner.RunError, match=r"results.json was computed on dataset .*differ in digest"
    ):
        runner.run(_folder_config(c), workdir=str(wd2))
    assert json.loads((wd2 / "results.json").read_text()) == previous

    # re-attacking a finished run with another --data_dir
    wd3 = tmp_path / "attack"
    _save_checkpoint(wd3, _folder_config(a, epochs=1), epoch=1)
    with pytest.raises(runner.RunError, match=f"the run in {wd3} was computed on dataset .*{c}"):
        runner.attack_workdir(str(wd3), overrides={"data_dir": str(c)})


@pytest.fixture
def read_only_runner(tmp_path):
    """``(tmp_path, run)``: ``run(module, *args)`` runs a child that file permissions apply to.

    As root, permissions do not stop writes: the child then runs under ``setpriv`` without the
    capabilities that override them (skipped where ``setpriv`` is missing).
    """
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, sys.executable, "-m", module, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )

    yield tmp_path, run
    for d, _, _ in os.walk(tmp_path):
        os.chmod(d, 0o755)  # let pytest clean up


def test_read_only_workdir_is_a_clear_error(read_only_runner):
    base, run = read_only_runner
    ro = os.path.join(base, "ro")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    for wd in (ro, os.path.join(ro, "new_run")):
        proc = run("experiments.run", *SMALL, f"--workdir={wd}")
        assert proc.returncode != 0
        assert f"error: cannot use --workdir={wd}: {ro} is not writable" in proc.stderr, (
            proc.stderr[-2000:]
        )
        assert "Traceback" not in proc.stderr
    assert os.listdir(ro) == []


@pytest.mark.slow
def test_attack_on_a_read_only_workdir_prints_then_says_nothing_was_saved(read_only_runner):
    from cem_jax import config

    base, run = read_only_runner
    wd = base / "finished"
    cfg = config.make_config(
        "paper", dataset="synthetic", train_subset=64, test_subset=32, batch_size=32, epochs=1
    )
    cfg = __import__("dataclasses").replace(cfg, attacks=())
    _save_checkpoint(wd, cfg, epoch=1)
    (wd / "results.json").write_text('{"old": true}')
    for d in (wd, *[p for p in wd.rglob("*") if p.is_dir()]):
        os.chmod(d, 0o555)
    proc = run("experiments.attack", f"--workdir={wd}", "--cache_dir=")
    assert proc.returncode != 0
    assert "test accuracy" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the results above were NOT saved" in proc.stderr and str(wd / "results.json") in (
        proc.stderr
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (wd / "results.json").read_text() == '{"old": true}'


@pytest.mark.slow
def test_blow_up_on_the_last_step_of_an_epoch_writes_no_checkpoint(tmp_path):
    # one step per epoch: the step's loss is finite, the update it makes is not
    args = [a for a in SMALL if not a.startswith("--train_subset")] + [
        "--train_subset=32",
        "--test_subset=32",
        "--lr=1e30",
    ]
    proc = run_module("experiments.run", *args, f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "non-finite on 32 of 32 test images after epoch 1" in proc.stderr, proc.stderr[-3000:]
    assert "no checkpoint was written. Lower --lr or --lambd." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path / "checkpoints") == []
    assert not (tmp_path / "results.json").exists()


def test_source_commit_is_the_one_this_process_started_with(monkeypatch):
    """A long sweep records the commit of the code it imported, not the HEAD of the moment a run
    finishes (a run that ended after new commits once recorded code that never ran)."""
    from cem_jax import runner

    reads = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(runner, "_read_source_commit", lambda: next(reads))
    runner.source_commit.cache_clear()
    try:
        assert runner.source_commit() == "aaaaaaaaaaaa"
        assert runner.source_commit() == "aaaaaaaaaaaa"  # HEAD moved on; the imported code did not
    finally:
        runner.source_commit.cache_clear()  # the next caller reads the real checkout
