"""Tests of benchmarks.attack_convergence: figures of recorded validation curves."""

from __future__ import annotations

import json

import pytest

from benchmarks import attack_convergence as ac


def _curve(values, every=100):
    return [{"step": every * (i + 1), "val_mse": v} for i, v in enumerate(values)]


def _record(values, converged=True, setting="train_time"):
    return {"attacks": {"decoder": {setting: {"curve": _curve(values), "converged": converged}}}}


def test_curve_figures_by_hand():
    f = ac.curve_figures(_curve([0.5, 0.2, 0.108, 0.101, 0.1, 0.1005, 0.102]))
    assert f["steps"] == 700 and f["best_step"] == 500 and f["best_val_mse"] == 0.1
    assert f["within_2pct"] == 400  # 0.101 <= 0.102
    assert f["within_5pct"] == 400  # 0.108 > 0.105
    assert f["within_10pct"] == 300  # 0.108 <= 0.110


def test_curve_figures_rejects_an_empty_curve():
    with pytest.raises(ValueError, match="empty"):
        ac.curve_figures([])


def test_summarize_skips_unconverged_and_takes_medians():
    records = [
        _record([0.3, 0.2, 0.2, 0.2]),  # steps 400, best 200
        _record([0.3, 0.25, 0.2, 0.15, 0.15, 0.15]),  # steps 600, best 400
        _record([0.3, 0.1], converged=False),
        {"attacks": {"whitebox": {"train_time": {"mse": 0.1}}}},  # no curve: not a fit loop
    ]
    s = ac.summarize(records)
    assert list(s) == ["decoder/train_time"]
    e = s["decoder/train_time"]
    assert e["runs"] == 2 and e["not_converged"] == 1
    assert e["steps"] == {"median": 500, "min": 400, "max": 600}
    assert e["best_step"] == {"median": 300, "min": 200, "max": 400}
    assert e["oracle_saving"] == pytest.approx((0.5 + 2 / 6) / 2)


def test_main_reads_a_file_and_prints_json(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(_record([0.3, 0.2, 0.2])) for _ in range(3)) + "\n")
    ac.main(["--runs", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["decoder/train_time"]["runs"] == 3
    with pytest.raises(SystemExit):
        ac.main(["--runs", str(tmp_path / "missing.jsonl")])
