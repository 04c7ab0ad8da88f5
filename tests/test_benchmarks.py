"""The benchmarks' contracts: ``benchmarks.train_step --json`` has exactly the documented keys
(the roofline ones only when measured), ``benchmarks.attack_step`` counts its step's FLOPs, and
the PyTorch reference step (``benchmarks.torch_train_step``) runs, or says clearly why it cannot;
``benchmarks.refresh`` times the mixture refresh and its parts.

Fast: no JAX train step is compiled and timed; the PyTorch step runs once at batch 4, the refresh
benchmark once on 200 images.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

import numpy as np
import pytest

from benchmarks import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


HAVE_TORCH = _have_torch()
DEFENSES = ("none", "noise", "cem_noise", "adversarial")
SYNCS = ("window", "step")


def _documented_keys(text: str) -> dict[str, str]:
    """``{key pattern: since}`` of the rows of the table under the heading 'Train step JSON keys'."""
    section = re.search(r"^### Train step JSON keys\n(.*?)(?=^#|\Z)", text, re.S | re.M)
    assert section, "docs/benchmarks.md has no '### Train step JSON keys' section"
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \| (\d+) \|", section.group(1), re.M)
    assert rows, "no key rows in the table of 'Train step JSON keys'"
    return {key: since for key, _, since in rows}


def _expand(pattern: str, defenses, syncs) -> set[str]:
    keys = {pattern}
    if "<defense>" in pattern:
        keys = {k.replace("<defense>", d) for k in keys for d in defenses}
    if "<sync>" in pattern:
        keys = {k.replace("<sync>", s) for k in keys for s in syncs}
    return keys


def _fake_rates(defenses, syncs) -> dict[str, float]:
    return {
        f"{d}/{s}": 100.0 + i for i, (d, s) in enumerate((d, s) for d in defenses for s in syncs)
    }


def _fake_gflop(defenses) -> dict[str, float]:
    return {d: 0.7 + 0.01 * i for i, d in enumerate(defenses)}


def test_json_keys_are_exactly_the_documented_ones():
    with open(DOCS, encoding="utf-8") as f:
        documented = _documented_keys(f.read())
    rates = _fake_rates(DEFENSES, SYNCS)
    out = train_step.json_result(
        rates,
        source="here @ abc",
        torch_rate=50.0,
        gflop_per_image=_fake_gflop(DEFENSES),
        matmul_gflops=180.0,
    )
    expected = set().union(*(_expand(p, DEFENSES, SYNCS) for p in documented))
    assert set(out) == expected
    assert out["schema"] == train_step.JSON_SCHEMA == max(int(s) for s in documented.values())
    assert out["source"] == "here @ abc"
    for d in DEFENSES:  # schema 1's key is the window figure
        assert out[d] == out[f"{d}/window"] == rates[f"{d}/window"]
    assert out["cem_noise/torch"] == 50.0
    assert out["cem_noise/window_over_torch"] == pytest.approx(rates["cem_noise/window"] / 50.0)
    for d, gflop in _fake_gflop(DEFENSES).items():
        assert out[f"{d}/gflop_per_image"] == gflop
    assert out["matmul_gflops"] == 180.0


def test_the_module_docstring_lists_the_same_keys():
    with open(DOCS, encoding="utf-8") as f:
        documented = _documented_keys(f.read())
    doc = train_step.__doc__
    listed = dict(re.findall(r"^``([^`]+)``\s+\S+\s+(\d+)\s", doc, re.M))
    assert listed == documented


ROOFLINE_KEYS = {f"{d}/gflop_per_image" for d in DEFENSES} | {"matmul_gflops"}


@pytest.mark.parametrize(
    "defenses, syncs, torch_rate, absent",
    [
        (("none", "noise"), ("window", "step"), None, {"cem_noise/torch"}),  # no PyTorch step
        (("cem_noise",), ("step",), 50.0, {"cem_noise", "cem_noise/window_over_torch"}),
    ],
)
def test_optional_keys_are_left_out_when_not_measured(defenses, syncs, torch_rate, absent):
    out = train_step.json_result(_fake_rates(defenses, syncs), source="s", torch_rate=torch_rate)
    assert not (absent | ROOFLINE_KEYS) & set(out)  # no GFLOP count, no matmul peak given
    assert {"schema", "source"} <= set(out)


def test_roofline_keys_only_for_the_defenses_counted():
    """A defense whose step could not be counted (an older checkout's trainer) has no
    ``<defense>/gflop_per_image``; the others and the matmul peak are there."""
    rates = _fake_rates(("none", "cem_noise"), ("window",))
    out = train_step.json_result(
        rates, source="s", gflop_per_image={"cem_noise": 0.771}, matmul_gflops=180.0
    )
    assert out["cem_noise/gflop_per_image"] == 0.771 and out["matmul_gflops"] == 180.0
    assert "none/gflop_per_image" not in out
    assert set(out) - set(rates) - {"schema", "source", "none", "cem_noise"} == {
        "cem_noise/gflop_per_image",
        "matmul_gflops",
    }
    out = train_step.json_result(rates, source="s", gflop_per_image={}, matmul_gflops=None)
    assert not ROOFLINE_KEYS & set(out)


def _attack_step_with(step, m=6, k=10, batch=4):
    import jax.numpy as jnp

    from benchmarks import attack_step

    state, images = jnp.ones((m, k), jnp.float32), jnp.ones((batch, k), jnp.float32)
    return attack_step.AttackStep("auto", step, state, images, injected=True)


def _dot_step(state, batch, key, step, base_lr, scale):
    """A stand-in for the attack's jitted step: its only FLOPs, 2·m·k per image."""
    del key, step, base_lr, scale
    return state @ batch.T


def test_attack_step_counts_the_jitted_attribute_by_parameter_name():
    """The wrapper ``attacks._decoder_train_step`` returns may expose its ``jax.jit`` as
    ``.jitted``, whose arguments the benchmark builds by name; an old step that is a ``jax.jit``
    itself (``(state, batch, step)``) is counted directly."""
    import jax

    step = lambda state, batch, i, scale: None  # noqa: E731
    step.jitted = jax.jit(_dot_step)
    gflop, counted = _attack_step_with(step).gflop_per_image()
    assert counted == "step" and gflop == pytest.approx(2 * 6 * 10 / 1e9)
    old = jax.jit(lambda state, batch, step: state @ batch.T)
    gflop, counted = _attack_step_with(old).gflop_per_image()
    assert counted == "step" and gflop == pytest.approx(2 * 6 * 10 / 1e9)


def test_attack_step_without_a_jitted_to_lower_counts_the_equivalent(monkeypatch):
    """A plain wrapper (or a ``jitted`` with parameters not known here): the decoder's
    value-and-grad, built in the benchmark, is counted instead (stubbed here: it compiles the
    decoder)."""
    import jax

    from benchmarks import attack_step

    monkeypatch.setattr(attack_step, "decoder_grad_gflop", lambda impl, batch: 0.345)
    step = lambda state, batch, i, scale: None  # noqa: E731
    assert _attack_step_with(step).gflop_per_image() == (0.345, "decoder_value_and_grad")
    step.jitted = jax.jit(lambda state, batch, other: state @ batch.T)
    assert _attack_step_with(step).gflop_per_image() == (0.345, "decoder_value_and_grad")


def test_importing_train_step_defines_no_flags():
    """Flags are defined when the program runs: importing it beside other programs (which define
    e.g. ``defenses``) must not collide."""
    from absl import flags

    assert "rounds" not in flags.FLAGS
    fv = flags.FlagValues()
    train_step.define_flags(fv)
    fv(["prog"])
    assert fv.torch is train_step.torch_available()
    assert fv.defenses == list(DEFENSES)


def _import_torch_step():
    sys.modules.pop("benchmarks.torch_train_step", None)
    return importlib.import_module("benchmarks.torch_train_step")


def test_torch_step_without_torch_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what ``import torch`` sees without torch
    monkeypatch.delitem(sys.modules, "benchmarks.torch_train_step", raising=False)
    with pytest.raises(ImportError, match=r"needs PyTorch.*pip install torch"):
        importlib.import_module("benchmarks.torch_train_step")
    sys.modules.pop("benchmarks.torch_train_step", None)


def test_torch_step_runs_one_step_or_says_why_not():
    """With torch (the ``bench`` extra): one step at batch 4 gives a finite loss and moves the
    weights; without it (the test extra has no torch): the clear ImportError."""
    if not HAVE_TORCH:
        with pytest.raises(ImportError, match=r"needs PyTorch.*pip install torch"):
            _import_torch_step()
        return
    import torch

    tts = _import_torch_step()
    torch.set_num_threads(1)
    for separate in (True, False):
        step = tts.make_step(4, separate_backward=separate, num_train=8)
        loss = step()
        assert loss.shape == () and np.isfinite(float(loss))
        assert np.isfinite(float(step()))  # the second batch wraps around the 8 images


def test_torch_cem_term_equals_cem_loss_reference_mode():
    """The official loops and cem_jax's batch-space ``cem_loss(mode="reference")`` agree, value
    and gradient, on the same features, labels and mixture."""
    if not HAVE_TORCH:
        with pytest.raises(ImportError, match=r"needs PyTorch"):
            _import_torch_step()
        return
    import jax
    import jax.numpy as jnp
    import torch

    from cem_jax import entropy

    tts = _import_torch_step()
    c, k, d, b = 10, 5, 512, 32
    centroids, weights, variances = tts.random_mixture(c, k, d, seed=1)
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 1, (b, d)).astype(np.float32)
    y = rng.integers(0, c, b)
    zt = torch.from_numpy(z).requires_grad_()
    loss_t = tts.cem_loss_reference(
        zt,
        torch.from_numpy(y),
        [torch.from_numpy(x) for x in centroids],
        [torch.from_numpy(x) for x in weights],
        [torch.from_numpy(x.mean(-1)) for x in variances],
        5000.0,
        0.1,
    )
    loss_t.backward()
    state = entropy.MixtureState(
        centroids=jnp.asarray(centroids),
        weights=jnp.asarray(weights),
        variances=jnp.asarray(variances),
        counts=jnp.full((c,), 5000),
    )
    loss_j, grad_j = jax.value_and_grad(
        lambda f: entropy.cem_loss(f, jnp.asarray(y), state, sigma=0.1, mode="reference")
    )(jnp.asarray(z))
    assert float(loss_t.detach()) == pytest.approx(float(loss_j), rel=1e-5)
    np.testing.assert_allclose(zt.grad.numpy(), np.asarray(grad_j), rtol=1e-4, atol=1e-9)


def test_refresh_benchmark_times_the_refresh_and_its_parts(capsys):
    # benchmarks.refresh --json: the figures its docstring names, consistent with each other (the
    # images/s is the images over the feature pass's seconds; the feature pass is part of the
    # refresh, so not more than the whole, with slack for timer noise on a shared CPU)
    import json

    from benchmarks import refresh

    refresh.main(["--num_images", "200", "--repeats", "1", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {
        "num_images",
        "refresh_s",
        "features_s",
        "features_images_per_s",
        "fit_s",
        "bound_s",
    }
    assert r["num_images"] == 200
    assert all(r[k] > 0 for k in ("refresh_s", "features_s", "fit_s", "bound_s"))
    assert r["features_images_per_s"] == pytest.approx(200 / r["features_s"])
    assert r["features_s"] < 3 * r["refresh_s"] + 0.5
    with pytest.raises(SystemExit):
        refresh.main(["--num_images", "5"])
    assert "--num_images must be >= 10" in capsys.readouterr().err


@pytest.mark.parametrize("warmup, expected_calls", [(True, 1 + 3 * 4), (False, 3 * 4)])
def test_median_seconds_counts_its_calls_and_times_per_call(warmup, expected_calls):
    import time

    import jax.numpy as jnp

    from benchmarks import timing

    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.005)
        return jnp.asarray(x)

    seconds = timing.median_seconds(fn, 7, repeats=3, calls=4, warmup=warmup)
    assert calls == [7] * expected_calls  # the warm-up, then repeats x calls, with the given args
    assert 0.005 <= seconds < 0.5  # per call, not per round of 4 (>= 0.02)


def test_median_seconds_is_the_median_of_the_rounds(monkeypatch):
    from benchmarks import timing

    clock = iter([0.0, 1.0, 10.0, 19.0, 30.0, 32.0])  # rounds of 1, 9 and 2 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.median_seconds(lambda: 0, repeats=3, warmup=False) == 2.0


def test_median_seconds_rejects_no_rounds():
    from benchmarks import timing

    with pytest.raises(ValueError, match="repeats and calls must be >= 1"):
        timing.median_seconds(lambda: 0, repeats=0)


def _sleep_step(seconds: float, log: str):
    """A step for ``StepWorker``'s tests: sleeps, and appends its process id to ``log``."""
    import time

    def step():
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return seconds

    return step


def test_step_worker_runs_the_steps_asked_for_in_a_process_of_its_own(tmp_path):
    """Each ``time(n)`` runs ``n`` more steps in the worker (after its two warm-up steps) and
    returns their wall time there; the worker is another process, with the allocator set as the
    programs set it (glibc)."""
    import platform

    from benchmarks import step_worker
    from cem_jax import xla_cpu

    log = tmp_path / "calls"
    factory = "tests.test_benchmarks:_sleep_step"
    with step_worker.StepWorker(factory, seconds=0.02, log=str(log)) as worker:
        assert worker.pid != os.getpid()
        assert log.read_text().split() == [str(worker.pid)] * 2  # the warm-up
        seconds = worker.time(3)
        assert 3 * 0.02 <= seconds < 3 * 0.02 + 5.0
        worker.time(1)
        assert log.read_text().split() == [str(worker.pid)] * 6
        if platform.libc_ver()[0] == "glibc" and os.environ.get(xla_cpu.MALLOC_OPT_OUT) != "0":
            assert worker.malloc == list(xla_cpu.MALLOC_SETTINGS)
        with pytest.raises(ValueError, match="steps must be >= 1"):
            worker.time(0)
    assert worker._proc.returncode == 0  # closed at end of input


def test_step_worker_says_which_factory_failed_and_why():
    from benchmarks import step_worker

    with pytest.raises(ValueError, match="'module:function'"):
        step_worker.StepWorker("benchmarks.torch_decoder.make_step")
    with pytest.raises(RuntimeError, match=r"tests.no_such_module:f exited(.|\n)*ModuleNotFound"):
        step_worker.StepWorker("tests.no_such_module:f")


def test_attack_step_rejects_an_unknown_torch_process():
    from benchmarks import attack_step

    with pytest.raises(ValueError, match="'own' or 'same'"):
        attack_step.bench_jax_vs_torch(4, 1, 1, torch_process="shared")
