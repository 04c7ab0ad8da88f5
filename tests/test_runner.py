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
def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    full = tmp_path / "full"
    proc = run_module("experiments.run", *SMALL, f"--workdir={full}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout  # the final summary

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
    for k in ("clean_acc", "defended_acc", "leakage_bits_diagonal", "leakage_bits_full"):
        assert b["final"][k] == pytest.approx(a["final"][k], rel=1e-4, abs=1e-4), k
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
        "--attacks=decoder,gan",
        "--attack_epochs=1",
        "--gan_epochs=1",
        "--test_subset=64",
        f"--workdir={wd}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _final(wd)
    for attack in ("decoder", "gan"):
        for setting in ("train_time", "inference_time"):
            m = res["attacks"][attack][setting]
            assert 0 <= m["mse"] <= 1 and np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
            assert m["wall_time_s"] > 0
    assert np.isfinite(res["final"]["leakage_bits_full"])
    assert res["final"]["leakage_bits_full"] <= res["final"]["leakage_bits_diagonal"] + 1e-3
    assert os.path.getsize(wd / "reconstructions.png") > 0
    assert "decoder" in proc.stdout and "PSNR" in proc.stdout

    # re-attack without retraining: decoder only
    proc = run_module(
        "experiments.attack", f"--workdir={wd}", "--attacks=decoder", "--attack_epochs=1"
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
