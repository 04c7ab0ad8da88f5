"""Tests of the results page: the frontier comparison and the page written from a table.json."""

from __future__ import annotations

import json
import math
import os

import pytest

from cem_jax.cli import collect, results_page

KEY = results_page.KEY
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(defense, acc, mse, std=0.001, n=3):
    return {
        "name": f"{defense}_{acc}",
        "defense": defense,
        "sigma": 0.1,
        "lambd": None,
        "n": n,
        "runs": [{"seed": s, "workdir": f"w{s}", "commit": "abc123"} for s in range(n)],
        "metrics": {
            "defended_acc": {"mean": acc, "std": 0.01, "n": n, "values": [acc] * n, "flagged": 0},
            KEY: {"mean": mse, "std": std, "n": n, "values": [mse] * n, "flagged": 0},
        },
    }


def test_frontier_comparison_interpolates_noise_at_equal_accuracy():
    recs = [
        _record("noise", 0.40, 0.010),
        _record("noise", 0.30, 0.020),
        _record("noise", 0.20, 0.040),
        _record("cem_noise", 0.35, 0.030),  # noise at 0.35: 0.015 -> +100 %
        _record("cem_noise", 0.10, 0.050),  # outside the noise points' accuracy range
    ]
    rows = results_page.frontier_comparison(recs)
    assert [r["name"] for r in rows] == ["cem_noise_0.35", "cem_noise_0.1"]
    assert rows[0]["base_mse"] == pytest.approx(0.015)
    assert rows[0]["gain"] == pytest.approx(1.0)
    # MSE stds 0.001 on both sides; accuracy stds 0.01 (point, both neighbours) through the segment's
    # slope -0.1 at t = 0.5: 0.1 * 0.01 * sqrt(1 + 0.5**2 + 0.5**2)
    acc_term = 0.1 * 0.01 * (1 + 0.25 + 0.25) ** 0.5
    assert rows[0]["acc_term"] == pytest.approx(acc_term)
    assert rows[0]["diff_std"] == pytest.approx((0.001**2 + 0.001**2 + acc_term**2) ** 0.5)
    assert rows[1]["base_mse"] is None
    text = results_page.answer(rows)
    assert "higher train-time decoder MSE than `noise` at 1 and a lower one at 0 of the 1" in text
    assert "+100%" in text and "higher than noise alone" in text


def test_one_seed_is_reported_but_not_counted():
    rows = results_page.frontier_comparison(
        [
            _record("noise", 0.4, 0.02, n=1),
            _record("noise", 0.2, 0.04, n=1),
            _record("cem_noise", 0.3, 0.06, n=1),  # +100 %, but no spread
        ]
    )
    text = results_page.answer(rows)
    assert "at 0 and a lower one at 0 of the 0 comparable points" in text
    assert "1 more comparable point(s) have one seed" in text
    assert "no spread: not evidence either way yet" in text and "+100%" in text


def test_answer_says_when_cem_is_not_better_or_not_comparable():
    rows = results_page.frontier_comparison(
        [
            _record("noise", 0.4, 0.02),
            _record("noise", 0.2, 0.04),
            _record("cem_noise", 0.3, 0.0301),
        ]
    )
    assert "not distinguishable from noise alone" in results_page.answer(rows)
    assert "Not answered yet" in results_page.answer([])


def test_write_page_from_table_json(tmp_path):
    recs = [
        _record("noise", 0.4, 0.01),
        _record("noise", 0.2, 0.03),
        _record("cem_noise", 0.3, 0.03),
        {**_record("cem_noise [reference]", 0.35, 0.03), "name": "cem_noise_s0.1_l1_reference"},
    ]
    # the compute section reads each run's wall time and devices, and the table's scale
    for r in recs:
        for run in r["runs"]:
            run.update(wall_time_s=600.0 + 60 * run["seed"], devices="1 x cpu")
    scale = {
        "config": {"arch": "vgg11_bn_sgm", "epochs": 6, "batch_size": 128},
        "dataset": {"num_train": 5000, "num_test": 2000},
    }
    root = tmp_path / "root"
    meta = {"dataset": "cifar10", "preset": "quick", "finished": 9, "runs": 9, "scale": scale}
    collect.write_table(str(root), recs, meta)
    (root / collect.PLOT_PNG).write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "docs" / "results.md"
    text = results_page.write_page(str(root), str(out), machine="2-core CPU")
    assert out.read_text() == text
    # which CEM: the reference variant against noise at 0.35 (0.02): +50 %
    assert "| cem_noise [reference] | cem_noise_s0.1_l1_reference | 3 | 0.350 |" in text
    assert "| 0.0200 (n=3) | +50% |" in text
    assert "vgg11_bn_sgm cut at layer 4 (the default), 6 epochs of batch 128 on 5000" in text
    assert "min per run (median; train + attack), on 1 x cpu (2-core CPU)" in text
    assert "12 runs, 2.2 h of wall time in all, 11.0 min per run" in text
    assert "recorded in" not in text  # no records file: no such line
    # the page draws its own frontier plot (not the 8-byte stand-in the sweep root holds)
    drawn = (tmp_path / "docs" / "results_privacy_utility.png").read_bytes()
    assert drawn[:4] == b"\x89PNG" and len(drawn) > 1000
    # no other family ran: the section says so and no families plot is drawn
    assert "## Every other defense family, with and without CEM" in text
    assert "(no run of another defense family finished yet)" in text
    assert not (tmp_path / "docs" / "results_families.png").exists()
    assert "![privacy-utility](results_privacy_utility.png)" in text
    # the runs pair by seed (noise / cem_noise at σ 0.1): the paired plot is drawn and shown
    assert "![paired by seed](results_pairs.png)" in text
    assert (tmp_path / "docs" / "results_pairs.png").read_bytes()[:4] == b"\x89PNG"
    assert "at 1 and a lower one at 0 of the 1 comparable points" in text and "+50%" in text
    assert "abc123" in text and "| cem_noise_0.3 |" in text
    # the page opens with the answer table, the frontier plot and the answer; the statistics follow
    order = [
        "| setting | seed pairs | `noise` attack MSE |",
        "![privacy-utility](results_privacy_utility.png)",
        "**The answer: at equal accuracy,",
        "## The statistics behind the answer",
        "**In short:",
        "## The pairs",
        "## Which CEM",
        "![variants](results_variants.png)",  # the frontier with cem_noise's variants
    ]
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)
    assert text.count("![privacy-utility]") == 1
    assert text.startswith(
        "# Results: CEM's privacy–utility frontier against noise alone\n\nDataset cifar10, preset "
        "`quick` (vgg11_bn_sgm, 6 epochs on 5000 training images;"
    )
    assert (tmp_path / "docs" / "results_variants.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="table.json not found"):
        results_page.write_page(str(tmp_path / "nothing"), str(out))
    assert json.loads((root / collect.TABLE_JSON).read_text())["rows"][0]["name"] == "noise_0.4"


def test_study_spec_expands_groups_with_variants(tmp_path):
    spec = collect.load_study(os.path.join(ROOT, "experiments/studies/frontier_cifar10.json"))
    pts = spec["points"]
    names = {collect.run_name(p) for p in pts}
    assert len(names) == len(pts)  # every run has its own workdir
    assert "noise_s0.05_seed1" in names and "cem_noise_s0.1_l0.32_reference_invlr_seed3" in names
    ref = next(p for p in pts if p.get("variant") == "reference_invlr")
    assert collect.overrides_of(ref) == {
        "defense": "cem_noise",
        "sigma": 0.1,
        "lambd": 0.32,
        "seed": ref["seed"],
        "cem_mode": "reference",
        "lambda_schedule": "inverse_lr",
    }
    assert collect.family(ref) == "cem_noise [reference_invlr]"
    # every other family three ways: pure X, cem_X (σ 0.1 + X + CEM), and X with σ 0.1 and no CEM
    for fam in ("dropout", "topk", "nopeek", "adversarial"):
        for arm in (fam, f"cem_{fam}", f"{fam}_with_noise"):
            assert {f"{arm}_seed{s}" for s in (1, 2, 3)} <= names
        noisy = next(p for p in pts if collect.run_name(p) == f"{fam}_with_noise_seed2")
        assert collect.overrides_of(noisy) == {"defense": fam, "seed": 2, "sigma": 0.1}
        assert collect.family(noisy) == f"{fam} [with_noise]"
    # the tie-break: three more seeds of the default and of the official loss with its schedule
    assert {f"cem_noise_s0.1_seed{s}" for s in (4, 5, 6)} <= names
    assert {f"cem_noise_s0.1_l0.32_reference_invlr_seed{s}" for s in (4, 5, 6)} <= names
    # ... and noise alone at σ 0.1 at those seeds, interleaved seed by seed: each finished seed is a
    # pair the page reads
    order = [collect.run_name(p) for p in pts]
    at = order.index("cem_noise_s0.1_seed4")
    assert order[at : at + 6] == [
        f"{d}_s0.1_seed{s}" for s in (4, 5, 6) for d in ("cem_noise", "noise")
    ]
    # the default loss at the hinge's λ 3: is the official loss's lead the hinge's or λ's?
    gmm3 = next(p for p in pts if collect.run_name(p) == "cem_noise_s0.1_l3_gmm_seed2")
    assert collect.overrides_of(gmm3)["cem_mode"] == "gmm" and gmm3["lambd"] == 3
    assert collect.family(gmm3) == "cem_noise [gmm]"
    # it runs right after the noise line at seed 1 (no earlier run measured it)
    assert order[5:8] == [f"cem_noise_s0.1_l3_gmm_seed{s}" for s in (1, 2, 3)]
    assert order[4] == "noise_s0.8_seed1" and order[8] == "cem_noise_s0.05_seed1"
    # the committed records file is the study's own: every recorded run is one of its runs, with
    # the configuration the spec gives it (else a fresh clone's sweep would refuse to go on)
    assert spec["records"] == "docs/results_runs.jsonl"
    from cem_jax import config as config_lib
    from cem_jax import runner

    by_name = {collect.run_name(p): p for p in pts}
    recorded = collect.read_records(os.path.join(ROOT, spec["records"]))
    for name, rec in recorded.items():
        assert name in by_name, f"{name} is recorded but not a run of the study"
        point = by_name[name]
        overrides = {**collect.study_common(spec, point), **collect.overrides_of(point)}
        cfg = config_lib.make_config(spec["preset"], dataset=spec["dataset"], **overrides)
        assert not collect.record_mismatch(
            rec, cfg.training_fingerprint(), runner.attack_config(cfg)
        ), name
    bad = tmp_path / "bad.json"
    bad.write_text('{"groups": [{"defenses": ["noise"], "sigma": [1]}]}')
    with pytest.raises(ValueError, match="unknown keys \\['sigma'\\]"):
        collect.load_study(str(bad))
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        collect.load_study(str(bad))


def test_line_comparison_matches_numpy_least_squares():
    import numpy as np

    rng = np.random.default_rng(0)
    noise = []
    for i, acc in enumerate((0.35, 0.3, 0.25, 0.2)):
        accs = list(acc + 0.02 * rng.standard_normal(3))
        mses = list(0.05 - 0.1 * np.array(accs) + 0.002 * rng.standard_normal(3))
        rec = _record("noise", acc, float(np.mean(mses)))
        rec["name"] = f"noise_{i}"
        rec["metrics"]["defended_acc"]["values"] = accs
        rec["metrics"][KEY]["values"] = mses
        noise.append(rec)
    cem = _record("cem_noise", 0.27, 0.04)
    fit = results_page.line_comparison([*noise, cem])
    xs = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in noise])
    ys = np.concatenate([r["metrics"][KEY]["values"] for r in noise])
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (intercept + slope * xs)
    assert fit["n"] == 12
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["resid_std"] == pytest.approx(np.sqrt(np.sum(resid**2) / 10))
    row = fit["rows"][0]
    assert row["line_mse"] == pytest.approx(intercept + slope * 0.27)
    assert row["gain"] == pytest.approx(0.04 / (intercept + slope * 0.27) - 1)
    assert row["inside"]
    text = results_page.line_paragraph(fit)
    assert "a straight line through all 12 noise runs" in text and "`cem_noise_0.27` (n=3" in text
    assert results_page.line_comparison([cem]) is None  # no noise run: no line


def test_undefended_check_line():
    assert "Undefended check: not run yet" in results_page.undefended_line([])
    none = _record("none", 0.36, 0.0087, n=3)
    none["metrics"]["decoder.train_time.baseline_mse"] = {"mean": 0.0610, "n": 3}
    none["metrics"]["decoder.train_time.psnr"] = {"mean": 21.21, "n": 3}
    text = results_page.undefended_line([none])
    assert "(`none`, n=3)" in text and "MSE 0.0087 (PSNR 21.21 dB)" in text
    # 10·log10(0.0610 / 0.0087) = 8.46, said to be the MSE ratio (the PSNR shown is a per-image mean)
    assert "+8.5 dB over the mean image (10·log10 of the MSE ratio)" in text


def _arm(defense, acc, mse, acc_std=0.01, mse_std=0.001, n=3, base=0.06):
    r = _record(defense, acc, mse, std=mse_std, n=n)
    r["name"] = defense.replace(" [", "_").rstrip("]")
    r["metrics"]["defended_acc"]["std"] = acc_std if n > 1 else None
    r["metrics"][KEY]["std"] = mse_std if n > 1 else None
    r["metrics"]["decoder.train_time.baseline_mse"] = {"mean": base, "std": 0.0, "n": n}
    return r


def test_families_three_arms_contrasts_and_plot(tmp_path):
    recs = [
        _record("noise", 0.40, 0.010),
        _record("noise", 0.20, 0.030),
        _arm("none", 0.40, 0.006),
        _arm("dropout", 0.38, 0.010),  # the pure defense
        _arm("dropout [with_noise]", 0.36, 0.014),  # + σ 0.1
        _arm("cem_dropout", 0.35, 0.024, acc_std=0.02, mse_std=0.002),  # + CEM
        _arm("topk", 0.30, 0.020, n=1),
        _arm("cem_topk", 0.25, 0.021, n=1),
    ]
    recs[5].update(lambd=1.0, cem_loss={"mode": "gmm", "schedule": "constant"})
    recs[7].update(lambd=0.32, cem_loss={"mode": "reference", "schedule": "inverse_lr"})
    lines = results_page.families_section(recs, "results_families.png")
    text = "\n".join(lines)
    # the cem_X arms say how they trained (the study pins its loss; the package default may differ)
    assert (
        "`cem_X` (σ = 0.1 + X + CEM, its CEM loss as these runs trained: `gmm` at λ 1 / "
        "`reference` at λ 0.32 × lr₀/lr)" in text
    )
    # arms: the noise frontier at acc 0.35 is 0.015 (linear between 0.40 and 0.20)
    assert "| dropout | cem_dropout | 3 | 0.350 ± 0.020 | 0.0240 ± 0.0020 | +4.0 dB |" in text
    assert "| 0.0150 (+60%) |" in text
    assert "| topk | topk [with_noise] | 0 | not run yet |" in text
    # cem_dropout against dropout: MSE +0.014 ± √(0.001² + 0.002²) = 0.0022 → higher (+140 %);
    # accuracy −0.03 ± √(0.01² + 0.02²) = 0.0224 → not distinguishable
    spread = (0.001**2 + 0.002**2) ** 0.5
    assert f"MSE +0.0140 ± {spread:.4f} (+140%)" in text
    assert "acc -0.0300 ± 0.0224: higher MSE, accuracy not distinguishable" in text
    # the noise line through the 6 noise runs has slope -0.1: the accuracy change alone would give
    # -0.1 * -0.03 = +0.003 of MSE, leaving +0.011
    assert "along the noise line, would give +0.0030 of MSE; the rest, +0.0110," in text
    # against the same defense with its noise: MSE +0.010 (+71 %), accuracy −0.01 → what CEM adds
    assert f"MSE +0.0100 ± {spread:.4f} (+71%)" in text
    # one seed: reported, not counted
    assert "MSE +0.0010 (+5%), acc -0.0500: one seed on a side: no spread yet" in text
    para = lines[-1]
    assert "higher in 1 (dropout) and lower in 0 of the 1 families" in para
    assert "what CEM itself adds: the attack MSE is higher in 1 (dropout)" in para
    # a CEM that only lowers accuracy is counted as such
    worse = results_page.family_contrast(_arm("nopeek", 0.40, 0.02), _arm("cem_nopeek", 0.30, 0.02))
    assert worse["acc"]["sign"] == -1 and worse["mse"]["sign"] == 0
    assert results_page.families_section(recs[:3], None) == [
        "(no run of another defense family finished yet)"
    ]
    png = tmp_path / "fam.png"
    assert results_page.plot_families(recs, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not results_page.plot_families(recs[:3], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_variants_verdict_against_the_default_at_the_same_sigma():
    def at(defense, name, acc, mse, std, n=3):
        return {**_record(defense, acc, mse, std=std, n=n), "name": name, "sigma": 0.1}

    recs = [
        _record("noise", 0.40, 0.010, std=0.001),
        _record("noise", 0.20, 0.030, std=0.001),
        # the default at acc 0.30: noise there 0.020, excess +0.005 ± √(0.001² + 0.001²)
        at("cem_noise", "cem_noise_s0.1", 0.30, 0.025, 0.001),
        # excess +0.012 at acc 0.35 (noise 0.015): +0.007 over the default's; spread: MSE stds
        # √(4·0.001²), accuracy stds 0.01 through the slope -0.1 (t = 0.5 for the default, 0.75
        # here): 0.1·0.01·√(1.5 + 1.625), so √(4e-6 + 3.125e-6) = 0.0027 -> beats it
        at("cem_noise [reference]", "cem_noise_s0.1_l0.3_reference", 0.35, 0.027, 0.001),
        # excess +0.006 at acc 0.25 (noise 0.025): +0.001, not distinguishable
        at("cem_noise [gmm_invlr]", "cem_noise_s0.1_l0.32_gmm_invlr", 0.25, 0.031, 0.001),
        # one seed: shown, not counted
        at(
            "cem_noise [reference_invlr]", "cem_noise_s0.1_l0.32_reference_invlr", 0.3, 0.04, 0, n=1
        ),
    ]
    text = results_page.variants_verdict(recs)
    assert (
        "`cem_noise_s0.1_l0.3_reference` (n=3) +0.0120 against the default's +0.0050 (n=3): "
        in text
    )
    assert "+0.0070 ± 0.0027, beats the default" in text
    assert "+0.0010 ± 0.0027, not distinguishable from the default" in text
    assert "reference_invlr` (n=1) +0.0200 against the default's +0.0050 (n=3)" in text
    assert "(n=3): +0.0150, one seed on a side: not evidence yet" in text  # no ± without a spread
    assert text.endswith("Beats the default: `cem_noise_s0.1_l0.3_reference`.")
    # excess -0.002: -0.007 under the default's, beyond twice the spread 0.0027
    recs[3] = at("cem_noise [reference]", "cem_noise_s0.1_l0.3_reference", 0.35, 0.013, 0.001)
    assert results_page.variants_verdict(recs).endswith(
        "None of the 2 variant(s) with two seeds on each side beats the default."
    )
    assert "below the default" in results_page.variants_verdict(recs)


def test_variants_line_verdict_matches_numpy_residuals():
    import numpy as np
    from scipy import stats

    def runs(defense, name, accs, mses):
        r = _record(defense, float(np.mean(accs)), float(np.mean(mses)), n=len(accs))
        r["name"], r["sigma"] = name, 0.1
        r["metrics"]["defended_acc"]["values"] = list(accs)
        r["metrics"][KEY]["values"] = list(mses)
        return r

    noise_acc, noise_mse = [0.40, 0.35, 0.30, 0.25, 0.20], [0.010, 0.016, 0.019, 0.026, 0.030]
    recs = [runs("noise", "noise", noise_acc, noise_mse)]
    recs.append(runs("cem_noise", "cem_noise_s0.1", [0.31, 0.33, 0.29], [0.024, 0.026, 0.027]))
    # how the default trained, as collect.summarize records it: the page names it so
    recs[-1].update(lambd=1.0, cem_loss={"mode": "gmm", "schedule": "constant"})
    recs.append(
        runs(
            "cem_noise [reference]",
            "cem_noise_s0.1_l1_reference",
            [0.3, 0.28, 0.35],
            [0.040, 0.043, 0.036],
        )  # fmt: skip
    )
    slope, intercept = np.polyfit(noise_acc, noise_mse, 1)

    def errors(r):
        m = r["metrics"]
        return np.array(m[KEY]["values"]) - (
            intercept + slope * np.array(m["defended_acc"]["values"])
        )

    def res(r):
        e = errors(r)
        return e.mean(), e.std(ddof=1)

    (md, sd), (mv, sv) = res(recs[1]), res(recs[2])
    text = results_page.variants_line_verdict(recs)
    welch = stats.ttest_ind(errors(recs[2]), errors(recs[1]), equal_var=False)
    assert (
        f"Welch t on the means {welch.statistic:+.1f} (" in text
        and f"p {welch.pvalue:.2g})" in text
    )
    assert f"`cem_noise_s0.1_l1_reference` {mv:+.4f} ± {sv:.4f} (n=3)" in text
    assert f"against `cem_noise_s0.1`'s {md:+.4f} ± {sd:.4f} (n=3)" in text
    delta, spread = mv - md, np.hypot(sv, sd)
    assert delta > 2 * spread  # the data are built so that the hinge clearly wins
    assert f"{delta:+.4f} ± {spread:.4f}, beats the default" in text
    assert "Beats the default: `cem_noise_s0.1_l1_reference`." in text
    # the decision sentence closes the section; the runs pair by seed (3 pairs), so the rule applies
    paired = [float(x) for x in errors(recs[2]) - errors(recs[1])]
    m, s = np.mean(paired), np.std(paired, ddof=1)
    assert m > 2 * s  # built so
    assert (
        f"`cem_noise_s0.1_l1_reference` (+{m:.4f} ± {s:.4f} over 3 pairs) leads the default by the "
        "most, so it replaces `gmm` at λ 1 as the package's default"
    ) in text
    titles = [title for title, _ in results_page.pair_panels(recs)]
    assert "each variant against the default (gmm, λ 1)" in titles
    recs[1]["cem_loss"], recs[1]["lambd"] = {"mode": "reference", "schedule": "inverse_lr"}, 0.32
    assert results_page.default_label(recs) == "`reference` at λ 0.32 × lr₀/lr"
    recs[1].pop("cem_loss")  # a table from before cem_loss: the point's name
    assert results_page.default_label(recs) == "`cem_noise_s0.1`"
    assert "needs at least 3" in results_page.variants_line_verdict(recs[1:])


def test_default_decision_applies_the_readme_rule():
    rows = [
        ("a_gmm_l3", 3, 0.0070, 0.0022),  # beats: 0.0070 > 2 * 0.0022
        ("b_reference_l3", 3, 0.0150, 0.0050),  # beats, the larger lead
        ("c_reference_l1", 3, 0.0100, 0.0060),  # larger mean than a, but within twice its spread
        ("d_gmm_invlr", 3, -0.0001, 0.0030),
    ]
    text = results_page.default_decision(rows)
    assert "every variant has 3 pairs or more" in text
    assert (
        "`b_reference_l3` (+0.0150 ± 0.0050 over 3 pairs, the largest of the 2 that beat it)"
        in text
    )
    assert "so it replaces `gmm` at λ 1 as the package's default" in text
    # one variant still short of 3 pairs: no decision, the provisional reading marked as such
    short = rows[:3] + [("d_gmm_invlr", 1, 0.02, None)]
    text = results_page.default_decision(short)
    assert "3 of 4 have (still short: `d_gmm_invlr`)" in text
    assert "the default stays `gmm` at λ 1" in text and "not a decision yet" in text
    assert "`b_reference_l3`" in text
    # two pairs count towards a lead (the rule's minimum) but not towards completeness
    text = results_page.default_decision([("a", 2, 0.01, 0.001)])
    assert "still short: `a`" in text and "`a` (+0.0100 ± 0.0010 over 2 pairs)" in text
    # complete and nobody beats it
    text = results_page.default_decision(
        [r for r in rows if r[0] in ("c_reference_l1", "d_gmm_invlr")]
    )
    assert text.endswith(
        "none beats the default beyond twice its spread: the default stays `gmm` at λ 1."
    )
    assert "no variant has a pair" in results_page.default_decision([])


def test_welch_is_scipys_and_its_df_welch_satterthwaites():
    import numpy as np
    from scipy import stats

    a, b = [0.012, 0.021, 0.018, 0.015], [0.004, 0.011, 0.016]
    t, df, p = results_page.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-12)
    # the degrees of freedom, by hand: Welch–Satterthwaite
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2), rel=1e-12)
    assert results_page.welch(b, a)[0] == -t  # the sign follows a − b
    # no spread on either side: no test to run (scipy would warn), the difference is certain
    assert results_page.welch([1.0, 1.0], [0.0, 0.0]) == (math.inf, 2.0, 0.0)
    assert results_page.welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 2.0, 1.0)


def test_one_sample_paired_t_and_corr_are_scipys():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(4)
    a, b = 0.3 + 0.02 * rng.standard_normal(7), 0.29 + 0.02 * rng.standard_normal(7)
    out = results_page.one_sample_t(list(b - a))
    ref = stats.ttest_1samp(b - a, 0.0)
    assert out["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert out["p"] == pytest.approx(ref.pvalue, rel=1e-12) and out["df"] == 6
    assert out["mean"] == pytest.approx(np.mean(b - a)) and out["std"] == pytest.approx(
        np.std(b - a, ddof=1)
    )
    paired = results_page.paired_t(list(a), list(b))
    ref = stats.ttest_rel(b, a)
    assert paired["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert paired["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert paired["mean"] == pytest.approx(np.mean(b - a))
    assert results_page._corr(list(a), list(b)) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert results_page.t_pvalue(-2.5, 7.3) == pytest.approx(2 * stats.t.sf(2.5, 7.3), rel=1e-12)
    # one value: no test; no spread: certain (±inf, p 0) or nothing (0, p 1), without scipy's warning
    assert results_page.one_sample_t([0.1])["t"] is None
    assert results_page.one_sample_t([-0.1, -0.1]) == {
        "n": 2, "mean": -0.1, "std": 0.0, "t": -math.inf, "df": 1.0, "p": 0.0
    }  # fmt: skip
    assert results_page.paired_t([0.2, 0.3], [0.2, 0.3])["t"] == 0.0
    assert results_page._corr([0.1, 0.2], [0.3, 0.4]) is None  # below 3 values
    assert results_page._corr([0.1, 0.1, 0.1], [0.3, 0.4, 0.5]) is None  # no spread


def _runs(defense, name, accs, mses, sigma=0.1):
    import numpy as np

    r = _record(defense, float(np.mean(accs)), float(np.mean(mses)), n=len(accs))
    r["name"], r["sigma"] = name, sigma
    r["metrics"]["defended_acc"]["values"] = [float(a) for a in accs]
    r["metrics"][KEY]["values"] = [float(m) for m in mses]
    if len(accs) > 1:
        r["metrics"]["defended_acc"]["std"] = float(np.std(accs, ddof=1))
        r["metrics"][KEY]["std"] = float(np.std(mses, ddof=1))
    return r


def test_steep_frontier_segment_is_not_evidence():
    # Two noise points of nearly equal mean accuracy (seed spread 0.05) but different MSE: the
    # interpolated frontier between them is steep and not pinned down by the seeds. A cem point
    # 0.006 above it (MSE spread 0.001 on both sides) used to count as "higher"; through the
    # accuracies' spread it does not.
    recs = [
        _runs("noise", "noise_s0.4", [0.26, 0.36], [0.024, 0.024]),
        _runs("noise", "noise_s0.2", [0.262, 0.362], [0.017, 0.017]),
        _runs("noise", "noise_s0.05", [0.40, 0.42], [0.010, 0.010]),
        _runs("cem_noise", "cem_noise_s0.2", [0.26, 0.3605], [0.026, 0.028]),
    ]
    (row,) = results_page.frontier_comparison(recs)
    slope = (0.017 - 0.024) / (0.312 - 0.31)
    t = (0.31025 - 0.31) / 0.002
    sd, sd_cem = 0.1 / 2**0.5, 0.1005 / 2**0.5  # the accuracies' seed stds
    assert row["base_mse"] == pytest.approx(0.024 + t * (0.017 - 0.024))
    acc_term = abs(slope) * (sd_cem**2 + ((1 - t) * sd) ** 2 + (t * sd) ** 2) ** 0.5
    assert row["acc_term"] == pytest.approx(acc_term)
    assert row["diff"] > 2 * (row["std"] ** 2 + row["base_std"] ** 2) ** 0.5  # MSE spread alone
    assert "not distinguishable from noise alone" in results_page.answer([row])


def test_pooled_and_per_point_line_readings_match_numpy_and_scipy():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(1)
    noise, cem = [], []
    for i, sigma in enumerate((0.05, 0.1, 0.2, 0.4)):
        accs = 0.36 - 0.03 * i + 0.03 * rng.standard_normal(3)
        noise.append(
            _runs("noise", f"noise_s{sigma}", accs, 0.06 - 0.14 * accs + 0.004 * rng.standard_normal(3), sigma)
        )  # fmt: skip
        accs = 0.34 - 0.02 * i + 0.03 * rng.standard_normal(3)
        mses = 0.06 - 0.14 * accs + 0.006 + 0.004 * rng.standard_normal(3)  # CEM: +0.006
        cem.append(_runs("cem_noise", f"cem_noise_s{sigma}", accs, mses, sigma))
    fit = results_page.line_comparison([*noise, *cem])
    xs = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in noise])
    ys = np.concatenate([r["metrics"][KEY]["values"] for r in noise])
    slope, intercept = np.polyfit(xs, ys, 1)
    noise_res = ys - (intercept + slope * xs)
    cx = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in cem])
    cy = np.concatenate([r["metrics"][KEY]["values"] for r in cem])
    cem_res = cy - (intercept + slope * cx)
    # per point: mean ± std of its seeds' residuals, counted against twice √(s² + scatter²)
    resid_std = np.sqrt(np.sum(noise_res**2) / (len(xs) - 2))
    for k, row in enumerate(fit["rows"]):
        e = cem_res[3 * k : 3 * k + 3]
        assert row["res_mean"] == pytest.approx(e.mean())
        assert row["res_std"] == pytest.approx(e.std(ddof=1))
        assert row["run_gains"] == pytest.approx(
            list(cy[3 * k : 3 * k + 3] / (cy - cem_res)[3 * k : 3 * k + 3] - 1)
        )
    higher = sum(
        r["res_mean"] > 2 * np.hypot(r["res_std"], resid_std) for r in fit["rows"]
    )  # fmt: skip
    text = results_page.line_paragraph(fit)
    assert f"higher at {higher} and lower at 0 of the 4 points with two seeds" in text
    # pooled: every cem run against the noise runs' residuals, Welch
    pool = results_page.pooled_line(fit)
    # the textbook error of a fitted line's mean prediction at the cem runs' mean accuracy,
    # sigma^2 (1/n + (xbar_c - xbar)^2 / Sxx), plus the cem runs' own scatter; Welch-Satterthwaite
    n, m = len(xs), len(cx)
    s2 = np.sum(noise_res**2) / (n - 2)
    var_fit = s2 * (1 / n + (cx.mean() - xs.mean()) ** 2 / np.sum((xs - xs.mean()) ** 2))
    var_runs = cem_res.var(ddof=1) / m
    t = cem_res.mean() / np.sqrt(var_runs + var_fit)
    df = (var_runs + var_fit) ** 2 / (var_runs**2 / (m - 1) + var_fit**2 / (n - 2))
    assert pool["n"] == 12 and pool["points"] == 4
    assert pool["mean"] == pytest.approx(cem_res.mean())
    assert pool["std"] == pytest.approx(cem_res.std(ddof=1))
    assert pool["se_fit"] == pytest.approx(np.sqrt(var_fit))
    assert pool["gain"] == pytest.approx(np.mean(cy / (cy - cem_res) - 1))
    assert pool["t"] == pytest.approx(t) and pool["df"] == pytest.approx(df)
    assert pool["p"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert t > 2  # built with a +0.006 excess over 12 runs
    para = results_page.pooled_paragraph(fit)
    assert para.startswith("**Pooled against the noise line: `cem_noise` gives a higher attack MSE")
    assert f"lie {cem_res.mean():+.4f} ± {cem_res.std(ddof=1):.4f}" in para
    # no excess: not distinguishable
    for r in cem:
        m = r["metrics"]
        m[KEY]["values"] = [
            v - 0.006 - float(np.mean(cem_res) - 0.006) for v in m[KEY]["values"]
        ]  # fmt: skip
    fit0 = results_page.line_comparison([*noise, *cem])
    assert abs(results_page.pooled_line(fit0)["t"]) < 2
    assert "is not distinguishable from noise alone" in results_page.pooled_paragraph(fit0)
    assert "not answered yet" in results_page.pooled_paragraph(None)


def test_curvature_check_matches_lstsq_and_scipy():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(2)
    noise, cem = [], []
    for i, sigma in enumerate((0.05, 0.1, 0.2, 0.4, 0.8)):
        accs = 0.38 - 0.035 * i + 0.02 * rng.standard_normal(3)
        mses = 2.0 * (accs - 0.45) ** 2 + 0.004 + 0.001 * rng.standard_normal(3)  # curved
        noise.append(_runs("noise", f"noise_s{sigma}", accs, mses, sigma))
    for sigma in (0.1, 0.2):
        accs = 0.31 + 0.02 * rng.standard_normal(3)
        mses = 2.0 * (accs - 0.45) ** 2 + 0.004 + 0.003 + 0.001 * rng.standard_normal(3)
        cem.append(_runs("cem_noise", f"cem_noise_s{sigma}", accs, mses, sigma))
    out = results_page.curvature_check([*noise, *cem])
    x = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in noise])
    y = np.concatenate([r["metrics"][KEY]["values"] for r in noise])
    design = np.stack([np.ones_like(x), x, x * x], axis=1)
    coef2, rss2, *_ = np.linalg.lstsq(design, y, rcond=None)
    coef1, rss1, *_ = np.linalg.lstsq(design[:, :2], y, rcond=None)
    f = (rss1[0] - rss2[0]) / (rss2[0] / (len(x) - 3))
    assert out["n_base"] == 15 and out["n"] == 6
    assert out["f"] == pytest.approx(f)
    assert out["p_curvature"] == pytest.approx(stats.f.sf(f, 1, len(x) - 3), rel=1e-9)
    assert out["p_curvature"] < 0.01  # the noise runs were built curved
    cx = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in cem])
    cy = np.concatenate([r["metrics"][KEY]["values"] for r in cem])
    other = np.stack([np.ones_like(cx), cx, cx * cx], axis=1)
    res = cy - other @ coef2
    # the fit's error at the cem runs' mean design row, through the coefficients' covariance
    cov = rss2[0] / (len(x) - 3) * np.linalg.inv(design.T @ design)
    v = other.mean(axis=0)
    var_fit, var_runs = v @ cov @ v, res.var(ddof=1) / len(res)
    t = res.mean() / np.sqrt(var_fit + var_runs)
    df = (var_fit + var_runs) ** 2 / (var_runs**2 / (len(res) - 1) + var_fit**2 / (len(x) - 3))
    assert out["mean"] == pytest.approx(res.mean()) and out["std"] == pytest.approx(res.std(ddof=1))
    assert out["t"] == pytest.approx(t) and out["df"] == pytest.approx(df)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    text = results_page.pooled_paragraph(results_page.line_comparison([*noise, *cem]), curved=out)
    assert f"F {f:.2f}, p {out['p_curvature']:.2g}" in text and f"t {t:+.1f}" in text
    assert results_page.curvature_check([*noise[:1], *cem]) is None  # 3 noise runs: no quadratic


def test_pooled_reading_is_calibrated_under_the_null_and_sees_a_real_excess():
    # The study's shape: 5 noise sigma x 3 seeds, 4 cem sigma x 2 seeds, accuracy seed spread 0.04,
    # a run's scatter about the frontier 0.006. With no excess, |t| > 2 must be rare (two-sided
    # p ~ 0.06 at ~15 df); with the excess the rerun reads (+0.007), it must be seen most times.
    import numpy as np

    rng = np.random.default_rng(3)

    def study(excess):
        recs = []
        for sigma, acc in zip((0.05, 0.1, 0.2, 0.4, 0.8), (0.35, 0.34, 0.31, 0.30, 0.22)):
            accs = acc + 0.04 * rng.standard_normal(3)
            mses = 0.066 - 0.15 * accs + 0.006 * rng.standard_normal(3)
            recs.append(_runs("noise", f"noise_s{sigma}", accs, mses, sigma))
        for sigma, acc in zip((0.05, 0.1, 0.2, 0.4), (0.34, 0.30, 0.29, 0.32)):
            accs = acc + 0.04 * rng.standard_normal(2)
            mses = 0.066 - 0.15 * accs + excess + 0.006 * rng.standard_normal(2)
            recs.append(_runs("cem_noise", f"cem_noise_s{sigma}", accs, mses, sigma))
        fit = results_page.line_comparison(recs)
        # t as pooled_line computes it, by hand (its checks are in the test above)
        (xs, _), (cx, cy) = (
            (np.asarray(v) for v in fit["xy"]),
            (np.asarray(v) for v in fit["other_xy"]),
        )
        res = cy - (fit["intercept"] + fit["slope"] * cx)
        s2 = np.sum(np.square(fit["resid"])) / (xs.size - 2)
        var_fit = s2 * (1 / xs.size + (cx.mean() - xs.mean()) ** 2 / np.sum((xs - xs.mean()) ** 2))
        return res.mean() / np.sqrt(res.var(ddof=1) / res.size + var_fit), fit

    t, fit = study(0.0)
    assert results_page.pooled_line(fit)["t"] == pytest.approx(t)
    null = np.array([study(0.0)[0] for _ in range(1000)])
    assert 0.03 < np.mean(np.abs(null) > 2) < 0.10
    seen = np.array([study(0.007)[0] for _ in range(300)])
    assert np.mean(seen > 2) > 0.7


def test_pair_panels_and_plot_pairs(tmp_path):
    def at(defense, name, sigma, accs, mses, seeds):
        r = _record(defense, sum(accs) / len(accs), sum(mses) / len(mses), n=len(accs))
        r["name"], r["sigma"] = name, sigma
        r["metrics"]["defended_acc"].update(values=list(accs), seeds=list(seeds))
        r["metrics"][KEY].update(values=list(mses), seeds=list(seeds))
        return r

    recs = [
        at("noise", "noise_s0.1", 0.1, [0.30, 0.35, 0.40], [0.010, 0.012, 0.014], [1, 2, 3]),
        at("noise", "noise_s0.2", 0.2, [0.25, 0.20], [0.020, 0.030], [1, 2]),
        # seed 2 and 4: only seed 2 pairs with noise at σ 0.1
        at("cem_noise", "cem_noise_s0.1", 0.1, [0.31, 0.33], [0.020, 0.025], [2, 4]),
        at(
            "cem_noise [reference]", "cem_noise_s0.1_l3_reference", 0.1, [0.29], [0.03], [4]
        ),  # pairs with the default's seed 4
        at(
            "cem_noise [gmm]", "cem_noise_s0.4_l3_gmm", 0.4, [0.2], [0.04], [4]
        ),  # no default at σ 0.4
    ]
    panels = results_page.pair_panels(recs)
    assert [title for title, _ in panels] == [
        "cem_noise against noise, same σ and seed",
        "each variant against the default (cem_noise_s0.1)",  # no cem_loss recorded: its name
    ]  # no family ran: no third panel; σ 0.2 has no cem_noise run: no set
    (_, sets), (_, variants) = panels
    assert [lab for lab, _ in sets] == ["σ 0.1"]
    ((seed, dacc, dmse),) = sets[0][1]  # cem_noise − noise at seed 2
    assert seed == 2 and dacc == pytest.approx(0.31 - 0.35) and dmse == pytest.approx(0.020 - 0.012)
    assert variants == [
        ("s0.1_l3_reference", [(4, pytest.approx(0.29 - 0.33), pytest.approx(0.005))])
    ]
    png = tmp_path / "pairs.png"
    assert results_page.plot_pairs(recs, results_page.line_comparison(recs), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no pair at all: nothing drawn
    assert results_page.pair_panels(recs[:2]) == []
    assert not results_page.plot_pairs(recs[:2], None, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_same_sigma_section_pairs_cem_with_noise_at_its_sigma():
    def at(defense, sigma, acc, mse, acc_std=0.01, mse_std=0.001, n=3):
        r = _record(defense, acc, mse, std=mse_std, n=n)
        r["name"], r["sigma"] = f"{defense}_s{sigma}", sigma
        r["metrics"]["defended_acc"]["std"] = acc_std
        return r

    recs = [
        at("noise", 0.1, 0.40, 0.010),
        at("noise", 0.2, 0.20, 0.030),
        at("noise", 0.4, 0.30, 0.020),
        at("cem_noise", 0.2, 0.17, 0.036, acc_std=0.02, mse_std=0.002),
        at("cem_noise", 0.1, 0.39, 0.011),
        at("cem_noise", 0.8, 0.10, 0.050),  # no noise run at 0.8: not paired
    ]
    lines = results_page.same_sigma_section(recs)
    rows = [line for line in lines if line.startswith("| 0.")]
    assert [r.split(" |")[0] for r in rows] == ["| 0.1", "| 0.2"]  # sorted by σ, 0.8 left out
    # σ 0.2: MSE +0.006 ± √(0.001² + 0.002²); accuracy -0.03 ± √(0.01² + 0.02²); the noise line
    # (slope -0.1 through the 9 noise runs) gives +0.003 of it
    spread = (0.001**2 + 0.002**2) ** 0.5
    assert f"| 0.2 | 3 / 3 | MSE +0.0060 ± {spread:.4f} (+20%), acc -0.0300 ± 0.0224: " in rows[1]
    assert "higher MSE, accuracy not distinguishable" in rows[1]
    assert "would give +0.0030 of MSE; the rest, +0.0030," in rows[1]
    # σ 0.1: +0.001 ± 0.0014 is not distinguishable
    assert "MSE +0.0010 ± 0.0014 (+10%)" in rows[0] and "not distinguishable MSE" in rows[0]
    assert results_page.same_sigma_section(recs[:3]) == []


def _seeded(defense, name, sigma, seeds, accs, mses):
    """A grid point whose metrics carry their seeds (as collected tables do)."""
    r = _runs(defense, name, accs, mses, sigma)
    r["runs"] = [{"seed": s, "workdir": f"w{s}", "commit": "abc123"} for s in seeds]
    for key in ("defended_acc", KEY):
        r["metrics"][key]["seeds"] = list(seeds)
    return r


def test_by_seed_and_seed_pairs_match_runs_by_seed():
    a = _seeded("noise", "noise_s0.1", 0.1, [1, 2, 3], [0.30, 0.31, 0.32], [0.010, 0.011, 0.012])
    b = _seeded(
        "cem_noise", "cem_noise_s0.1", 0.1, [3, 2, 4], [0.28, 0.29, 0.27], [0.02, 0.03, 0.04]
    )
    assert results_page.by_seed(b, KEY) == {3: 0.02, 2: 0.03, 4: 0.04}
    # seed 1 and 4 have no partner; pairs come sorted by seed
    assert results_page.seed_pairs(a, b) == [
        (2, 0.31, 0.011, 0.29, 0.03),
        (3, 0.32, 0.012, 0.28, 0.02),
    ]
    # a table without the metric's seeds (collected before they were recorded): the runs' order,
    # and nothing when a run lacks the metric (values no longer line up with the runs)
    old = _runs("noise", "noise_s0.1", [0.3, 0.4], [0.01, 0.02])
    old["runs"] = [{"seed": 5}, {"seed": 7}]
    assert results_page.by_seed(old, KEY) == {5: 0.01, 7: 0.02}
    old["runs"].append({"seed": 9})
    assert results_page.by_seed(old, KEY) == {}


def test_paired_differences_match_scipy_and_count_the_slope_error():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(7)
    noise = []
    for sigma, acc in zip((0.05, 0.1, 0.2, 0.4), (0.35, 0.33, 0.30, 0.25), strict=True):
        accs = acc + 0.03 * rng.standard_normal(3)
        noise.append(_seeded("noise", f"noise_s{sigma}", sigma, [1, 2, 3], accs,
                             0.066 - 0.15 * accs + 0.005 * rng.standard_normal(3)))  # fmt: skip
    fit = results_page.line_comparison(noise)
    seeds = [1, 2, 3, 4, 5]
    acc_a, acc_b = 0.3 + 0.04 * rng.standard_normal(5), 0.29 + 0.04 * rng.standard_normal(5)
    mse_a, mse_b = 0.02 + 0.003 * rng.standard_normal(5), 0.03 + 0.003 * rng.standard_normal(5)
    pairs = list(zip(seeds, acc_a, mse_a, acc_b, mse_b, strict=True))
    out = results_page.paired_differences(pairs, fit)
    ref = stats.ttest_rel(mse_b, mse_a)
    assert out["mse"]["t"] == pytest.approx(ref.statistic)
    assert out["mse"]["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    ref = stats.ttest_rel(acc_b, acc_a)
    assert out["acc"]["t"] == pytest.approx(ref.statistic)
    assert out["acc"]["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert out["acc_corr"] == pytest.approx(np.corrcoef(acc_a, acc_b)[0, 1])
    # at equal accuracy: e = ΔMSE − b·Δacc, its variance s_e²/n + (mean Δacc)²·var(b) with var(b)
    # from an independent least-squares fit (numpy's polyfit covariance, unscaled → σ̂²/Sxx)
    xs, ys = (np.asarray(v) for v in fit["xy"])
    (b, _), cov = np.polyfit(xs, ys, 1, cov=True)
    d_acc, e = acc_b - acc_a, (mse_b - mse_a) - b * (acc_b - acc_a)
    var_pairs, var_slope = e.var(ddof=1) / 5, d_acc.mean() ** 2 * cov[0, 0]
    se = np.sqrt(var_pairs + var_slope)
    df = (var_pairs + var_slope) ** 2 / (var_pairs**2 / 4 + var_slope**2 / (xs.size - 2))
    adj = out["adj"]
    assert fit["slope_se"] == pytest.approx(np.sqrt(cov[0, 0]))  # linregress's, against polyfit's
    assert adj["mean"] == pytest.approx(e.mean())
    assert adj["se"] == pytest.approx(se)
    assert adj["t"] == pytest.approx(e.mean() / se)
    assert adj["df"] == pytest.approx(df)
    assert adj["p"] == pytest.approx(2 * stats.t.sf(abs(e.mean() / se), df), rel=1e-9)
    # each seed as one unit: the mean of its pairs' e over σ, then a one-sample t over seeds
    two = pairs + [(s, a + 0.01, m, c, d) for s, a, m, c, d in pairs]
    units = results_page.seed_units(two, fit)
    per_seed = [np.mean([(d - m) - fit["slope"] * (c - a) for s2, a, m, c, d in two if s2 == s])
                for s in seeds]  # fmt: skip
    ref = stats.ttest_1samp(per_seed, 0.0)
    assert units["n"] == 5 and units["t"] == pytest.approx(ref.statistic)
    assert results_page.paired_differences([], fit) is None


def test_paired_reading_removes_a_shared_seed_swing():
    # Common random numbers: a seed moves both arms' accuracy (±0.04) and attack MSE (±0.004)
    # alike, as the study's seeds do (subset, init, batch order, noise draws). A CEM excess of
    # +0.003 at equal accuracy is lost in the unpaired spread but seen paired; with no excess the
    # paired t stays calibrated (|t| > 2 about as often as Student's t with 11 df says, 6.7 %).
    import numpy as np

    rng = np.random.default_rng(11)

    def study(excess):
        recs, seeds = [], [1, 2, 3]
        swing_acc, swing_mse = 0.04 * rng.standard_normal(3), 0.004 * rng.standard_normal(3)
        for sigma, acc in zip((0.05, 0.1, 0.2, 0.4), (0.35, 0.33, 0.30, 0.26), strict=True):
            for defense, extra in (("noise", 0.0), ("cem_noise", excess)):
                accs = acc + swing_acc + 0.004 * rng.standard_normal(3)
                mses = 0.066 - 0.15 * accs + swing_mse + extra + 0.001 * rng.standard_normal(3)
                recs.append(_seeded(defense, f"{defense}_s{sigma}", sigma, seeds, accs, mses))
        return recs

    def paired_t(recs):
        fit = results_page.line_comparison(recs)
        pairs = [p for _, b, o in results_page.same_sigma_pairs(recs)
                 for p in results_page.seed_pairs(b, o)]  # fmt: skip
        d = np.array([(mb - ma) - fit["slope"] * (ab - aa) for _, aa, ma, ab, mb in pairs])
        return d.mean() / (d.std(ddof=1) / np.sqrt(d.size))  # the slope's share is tiny here

    recs = study(0.003)
    fit = results_page.line_comparison(recs)
    lines = results_page.same_sigma_section(recs, fit=fit)
    row = next(line for line in lines if line.startswith("| 0.1 |"))
    unpaired, paired = row.split(" | ")[2], row.split(" | ")[3]
    assert "not distinguishable MSE" in unpaired  # ±√(s₁² + s₂²) carries the seed swing twice
    assert "3 pair(s): at equal accuracy +0.00" in paired and "), higher;" in paired
    text = results_page.paired_paragraph(recs, fit)
    assert text.startswith("**Paired by seed**") and "over the 12 pairs of 4 σ" in text.lower()
    assert ": higher attack MSE than noise alone." in text
    assert "With each seed as one unit instead" in text
    null = np.array([paired_t(study(0.0)) for _ in range(400)])
    assert 0.03 < np.mean(np.abs(null) > 2) < 0.12
    seen = np.array([paired_t(study(0.003)) for _ in range(100)])
    assert np.mean(seen > 2) > 0.9


def test_short_answer_reads_the_pairs_first_and_falls_back_to_the_pooled_line():
    import numpy as np

    rng = np.random.default_rng(5)
    recs = []
    swing = 0.04 * rng.standard_normal(3)
    for sigma, acc in zip((0.05, 0.1, 0.2, 0.4), (0.35, 0.33, 0.30, 0.26), strict=True):
        for defense, extra in (("noise", 0.0), ("cem_noise", 0.004)):
            accs = acc + swing + 0.004 * rng.standard_normal(3)
            mses = 0.066 - 0.15 * accs + extra + 0.001 * rng.standard_normal(3)
            recs.append(_seeded(defense, f"{defense}_s{sigma}", sigma, [1, 2, 3], accs, mses))
    fit = results_page.line_comparison(recs)
    pairs = [p for _, b, o in results_page.same_sigma_pairs(recs)
             for p in results_page.seed_pairs(b, o)]  # fmt: skip
    d = np.array([(mb - ma) - fit["slope"] * (ab - aa) for _, aa, ma, ab, mb in pairs])
    d_acc = np.array([ab - aa for _, aa, _, ab, _ in pairs])
    text = results_page.short_answer(recs, fit)
    assert text.startswith(
        "**In short: at equal accuracy, `cem_noise` gives a higher attack MSE than `noise` alone**"
        f", by {d.mean():+.4f} ± {d.std(ddof=1):.4f} (mean ± std over the 12 pairs of runs at the "
        "same σ and seed, 4 σ × 3 seeds;"
    )
    pool = results_page.pooled_line(fit)
    assert pool["t"] > 2 and "unpaired, agrees" in text
    assert f"The accuracy it costs: {d_acc.mean():+.4f} ± {d_acc.std(ddof=1):.4f} per pair" in text
    # no run of cem_noise at a seed noise ran: the pooled line alone
    for r in recs:
        if r["defense"] == "cem_noise":
            for key in ("defended_acc", KEY):
                r["metrics"][key]["seeds"] = [4, 5, 6]
    text = results_page.short_answer(recs, fit)
    assert "No pair of runs at the same σ and seed yet" in text
    assert f"{pool['mean']:+.4f} ± {pool['std']:.4f}" in text
    assert "not answered yet" in results_page.short_answer([], None)


def test_the_package_default_is_what_the_committed_records_decide():
    """The README's rule applied to the committed records (the rerun page's "The default, by that
    rule") names a winner; the presets train with exactly its loss, λ schedule and λ."""
    import re

    from cem_jax import config as config_lib
    from cem_jax import defenses

    spec = collect.load_study(os.path.join(ROOT, "experiments/studies/frontier_cifar10.json"))
    by_name = {collect.run_name(p): p for p in spec["points"]}
    recorded = collect.read_records(os.path.join(ROOT, spec["records"]))
    rows = collect.summarize([(by_name[n], rec) for n, rec in recorded.items()])
    text = results_page.variants_line_verdict(rows)
    decision = text[text.index("**The default, by that rule:**") :]
    assert "every variant has 3 pairs or more" in decision, decision
    winner = re.search(r"`(cem_noise_[^`]+)` \(\+[0-9.]+ ± [0-9.]+ over \d+ pairs", decision)
    assert winner and "so it replaces" in decision, decision
    point = next(p for n, p in by_name.items() if collect.point_name(p) == winner.group(1))
    trained = {**collect.study_common(spec, point), **collect.overrides_of(point)}  # as it ran
    defaults = config_lib.RunConfig()
    assert trained["cem_mode"] == defaults.cem_mode
    assert trained["lambda_schedule"] == defaults.lambda_schedule
    assert trained["lambd"] == defenses.DEFAULT_LAMBDA == defenses.DEFENSES["cem_noise"]["lambd"]


def test_pair_layout_names_uneven_seed_counts():
    # the answer's "4 σ × 3 seeds" must not claim a full grid when one σ has more seeds
    def point(defense: str, sigma: float, seeds: list[int]) -> dict:
        n = len(seeds)
        return _seeded(defense, f"{defense}_s{sigma}", sigma, seeds, [0.3] * n, [0.02] * n)

    even = [point(d, s, [1, 2, 3]) for d in ("noise", "cem_noise") for s in (0.1, 0.2)]
    assert results_page.pair_layout(results_page.all_seed_pairs(even)[1]) == "2 σ × 3 seeds"
    uneven = [point(d, 0.1, [1, 2, 3, 4]) for d in ("noise", "cem_noise")]
    uneven += [point(d, s, [1, 2, 3]) for d in ("noise", "cem_noise") for s in (0.2, 0.4)]
    assert (
        results_page.pair_layout(results_page.all_seed_pairs(uneven)[1])
        == "3 σ, 3 seeds each and 4 at σ 0.1"
    )
    # a seed only one side ran is no pair
    lone = [point("noise", 0.1, [1, 2]), point("cem_noise", 0.1, [2, 3])]
    assert results_page.pair_layout(results_page.all_seed_pairs(lone)[1]) == "1 σ × 1 seed"


def _paired_study(rng, excess=0.004, seeds=(1, 2, 3)):
    """noise and cem_noise at 4 σ, the same seeds, a shared seed swing; cem_noise ``excess`` higher
    at equal accuracy."""
    recs, n = [], len(seeds)
    swing = 0.04 * rng.standard_normal(n)
    for sigma, acc in zip((0.05, 0.1, 0.2, 0.4), (0.35, 0.33, 0.30, 0.26), strict=True):
        for defense, extra in (("noise", 0.0), ("cem_noise", excess)):
            accs = acc + swing + 0.004 * rng.standard_normal(n)
            mses = 0.066 - 0.15 * accs + extra + 0.001 * rng.standard_normal(n)
            recs.append(_seeded(defense, f"{defense}_s{sigma}", sigma, list(seeds), accs, mses))
    return recs


def test_answer_table_is_the_paired_reading_per_sigma_and_pooled():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(8)
    recs = _paired_study(rng)
    rows = results_page.answer_rows(recs)
    assert [r["label"] for r in rows] == ["σ 0.05", "σ 0.1", "σ 0.2", "σ 0.4", "all σ"]
    assert [r["n"] for r in rows] == [3, 3, 3, 3, 12]
    # independently: the pairs, the noise runs' line (numpy), scipy's paired t-test
    noise = [r for r in recs if r["defense"] == "noise"]
    cem = [r for r in recs if r["defense"] == "cem_noise"]
    col = lambda rs, key: np.concatenate([r["metrics"][key]["values"] for r in rs])
    acc_a, mse_a, acc_b, mse_b = (
        col(noise, "defended_acc"),
        col(noise, KEY),
        col(cem, "defended_acc"),
        col(cem, KEY),
    )
    slope, _ = np.polyfit(acc_a, mse_a, 1)
    e = (mse_b - mse_a) - slope * (acc_b - acc_a)
    pooled = rows[-1]
    assert pooled["base_mse"] == pytest.approx(mse_a.mean())
    assert pooled["adj"]["mean"] == pytest.approx(e.mean())
    assert pooled["adj"]["std"] == pytest.approx(e.std(ddof=1))
    assert pooled["other_mse"] == pytest.approx(mse_a.mean() + e.mean())
    ref = stats.ttest_rel(acc_b, acc_a)
    assert pooled["acc"]["t"] == pytest.approx(ref.statistic)
    assert pooled["acc"]["p"] == pytest.approx(ref.pvalue)
    for k, row in enumerate(rows[:-1]):  # each σ: its own 3 pairs, the same line
        part = slice(3 * k, 3 * k + 3)
        assert row["adj"]["mean"] == pytest.approx(e[part].mean())
        assert row["acc"]["t"] == pytest.approx(stats.ttest_rel(acc_b[part], acc_a[part]).statistic)
    # the same numbers as the statistics that follow on the page (short_answer, the per-σ table)
    fit = results_page.line_comparison(recs)
    short = results_page.short_answer(recs, fit)
    adj, acc = pooled["adj"], pooled["acc"]
    assert f"by {adj['mean']:+.4f} ± {adj['std']:.4f}" in short and f"t {adj['t']:+.1f}" in short
    assert f"{acc['mean']:+.4f} ± {acc['std']:.4f} per pair (t {acc['t']:+.1f}" in short
    table = results_page.answer_table(recs)
    assert table[0].startswith(
        "| setting | seed pairs | `noise` attack MSE | `cem_noise` attack MSE at"
    )
    assert next(line for line in table if "all σ" in line) == (
        f"| **all σ** | 12 | {mse_a.mean():.4f} | {mse_a.mean() + e.mean():.4f} | "
        f"**{adj['mean']:+.4f} ± {adj['std']:.4f} ({adj['mean'] / mse_a.mean():+.0%}), "
        f"t {adj['t']:+.1f}** | {acc['mean']:+.4f} ± {acc['std']:.4f}, t {acc['t']:+.1f} |"
    )
    text = results_page.answer_sentences(recs)
    assert text.startswith(
        "**The answer: at equal accuracy, `cem_noise` gives a higher attack MSE than `noise` "
        f"alone**: {adj['mean']:+.4f} ({adj['mean'] / mse_a.mean():+.0%}) over 12 seed pairs at 4 σ"
    )
    up = sum(r["adj"]["t"] > 2 for r in rows[:-1])
    assert f"each σ alone reads higher at {up} and lower at 0 of the 4 σ" in text
    # each seed as one unit (its mean over the 4 σ), independently: a one-sample t over 3 seeds
    e_seed = e.reshape(4, 3).mean(axis=0)  # values run σ-major, seeds 1-3 within each σ
    acc_seed = (acc_b - acc_a).reshape(4, 3).mean(axis=0)
    t_e, t_acc = (
        stats.ttest_1samp(e_seed, 0.0).statistic,
        stats.ttest_1samp(acc_seed, 0.0).statistic,
    )
    assert pooled["seeds"] == 3 and pooled["units"]["t"] == pytest.approx(t_e)
    assert f"(t {adj['t']:+.1f}; with each seed as one unit t {t_e:+.1f} over 3 seeds)" in text
    assert f"t {acc['t']:+.1f}; with each seed as one unit t {t_acc:+.1f} over 3 seeds)" in text
    # a study's first seed run at several σ: t there counts one seed's pairs as independent
    first = [
        _seeded(
            r["defense"],
            r["name"],
            r["sigma"],
            [1],
            r["metrics"]["defended_acc"]["values"][:1],
            r["metrics"][KEY]["values"][:1],
        )
        for r in recs
    ]
    lone = results_page.answer_sentences(first)
    assert results_page.answer_rows(first)[-1]["seeds"] == 1
    assert lone.startswith("**The answer: not yet.** Every pair is one seed's (4 pairs at 4 σ)")
    assert "An answer needs pairs from two seeds or more." in lone and "at equal accuracy" in lone
    # cifar_full's shape part way: σ 0.1 at seeds 1-2, σ 0.2 at seed 1: the one σ with two
    # pairs is named with its own t, not counted as "higher at 0 and lower at 0 of the 1 σ"
    part = []
    for r in recs:
        if r["defense"] == "cem_noise" and r["sigma"] not in (0.1, 0.2):
            continue  # cem_noise at σ 0.1 and 0.2 only; noise at every σ (the line)
        seeds = [1, 2] if r["sigma"] == 0.1 else [1]
        accs, mses = (r["metrics"][k]["values"][: len(seeds)] for k in ("defended_acc", KEY))
        part.append(_seeded(r["defense"], r["name"], r["sigma"], seeds, accs, mses))
    part_rows = results_page.answer_rows(part)
    assert [(r["label"], r["n"]) for r in part_rows] == [("σ 0.1", 2), ("σ 0.2", 1), ("all σ", 3)]
    t01 = part_rows[0]["adj"]["t"]
    word = "higher" if t01 > 2 else "lower" if t01 < -2 else "not distinguishable"
    part_text = results_page.answer_sentences(part)
    assert (
        f"; σ 0.1 alone, the one σ with two pairs or more so far, reads {word} (t {t01:+.1f})"
        in part_text
    )
    assert "of the 1 σ" not in part_text
    # several σ, none beyond |t| 2 alone: said in words, not as "higher at 0 and lower at 0"
    flat = _paired_study(np.random.default_rng(3), excess=0.0)
    flat_rows = results_page.answer_rows(flat)[:-1]
    flat_text = results_page.answer_sentences(flat)
    assert all(abs(r["adj"]["t"]) < 2 for r in flat_rows)  # seed 3's draw: t 0.5, 0.6, -0.8, 1.2
    no_sigma = "; no σ alone (of the 4 with two pairs or more) reads a difference at |t| > 2"
    assert no_sigma in flat_text and "each σ alone reads" not in flat_text
    # no excess: the answer says so, whichever way it goes
    null = _paired_study(rng, excess=-0.02)
    assert "gives a lower attack MSE than `noise` alone" in results_page.answer_sentences(null)
    # nothing to pair: a placeholder, no sentences; one σ: no pooled row
    assert results_page.answer_table([])[0].startswith("(No answer yet")
    assert results_page.answer_sentences([]) == ""
    one = [r for r in recs if r["sigma"] == 0.1] + noise
    assert [r["label"] for r in results_page.answer_rows(one)] == ["σ 0.1"]
    assert "over 3 seed pairs at σ 0.1 (t" in results_page.answer_sentences(one)
    assert "each seed as one unit" not in results_page.answer_sentences(one)  # 3 pairs, 3 seeds


def test_answer_reads_one_preset_at_a_time():
    import numpy as np

    quick = _paired_study(np.random.default_rng(9))
    paper = _paired_study(np.random.default_rng(10), excess=0.02)
    for r in paper:
        r["preset"] = "paper"
    groups = results_page.by_preset([*quick, *paper], "quick")
    assert list(groups) == ["quick", "paper"]
    assert groups["quick"] == quick and groups["paper"] == paper
    assert results_page.answer_table(groups["quick"]) == results_page.answer_table(quick)
    assert results_page.answer_rows(groups["paper"])[-1]["adj"]["mean"] == pytest.approx(
        0.02, abs=0.003
    )


def test_the_committed_page_opens_with_what_the_committed_records_give():
    """docs/results.md is generated: its answer table is the records' (regenerate the page after
    recording a run)."""
    spec = collect.load_study(os.path.join(ROOT, "experiments/studies/frontier_cifar10.json"))
    by_name = {collect.run_name(p): p for p in spec["points"]}
    recorded = collect.read_records(os.path.join(ROOT, spec["records"]))
    rows = collect.summarize([(by_name[n], rec) for n, rec in recorded.items()])
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        page = f.read()
    table = "\n".join(results_page.answer_table(rows))
    head = page.split("\n\n", 2)[2]  # after the title and the data line
    assert head.startswith(table + "\n\n![privacy-utility](results_privacy_utility.png)")
    assert results_page.answer_sentences(rows) in page


def _scale_root(path, recs, preset, finished, runs, study=None):
    """A sweep root at ``path`` whose table.json holds ``recs`` of one preset (as the sweep writes)."""
    scale = {
        "config": {"arch": "vgg11_bn_sgm", "epochs": 10 if preset == "cifar_full" else 6},
        "dataset": {"num_train": 50000 if preset == "cifar_full" else 5000, "num_test": 10000},
    }
    meta = {"dataset": "cifar10", "preset": preset, "finished": finished, "runs": runs}
    meta.update(scale=scale, **({"study": study} if study else {}))
    collect.write_table(str(path), recs, meta)
    return str(path)


def _undefended(n):
    """A ``none`` point with its clean accuracy and mean-image baseline, as a collected table has."""
    r = _arm("none", 0.87, 0.006, n=n)
    r["metrics"]["clean_acc"] = {"mean": 0.871, "std": 0.004 if n > 1 else None, "n": n}
    for m in r["metrics"].values():
        m["flagged"] = 0
    return r


def test_a_scale_root_gets_its_own_answer_beside_the_opening(tmp_path):
    import numpy as np

    quick = _paired_study(np.random.default_rng(9))
    full = _paired_study(np.random.default_rng(10), excess=0.02)[2:]  # σ 0.1, 0.2, 0.4
    full.append(_undefended(3))
    root = _scale_root(tmp_path / "frontier", quick, "quick", 24, 24)
    study = "experiments/studies/full_cifar10.json"
    big = _scale_root(tmp_path / "full", full, "cifar_full", 19, 21, study=study)
    out = tmp_path / "docs" / "results.md"
    alone = results_page.write_page(root, str(out))
    text = results_page.write_page(root, str(out), scale_roots=[big])
    assert out.read_text() == text
    head = "## At scale: preset `cifar_full` (vgg11_bn_sgm, 10 epochs on 50000 training images)"
    section = text[text.index(head) : text.index("## The statistics behind the answer")]
    # right after the opening's answer; the opening and the statistics are the quick scale's alone
    opening = text[: text.index(head)]
    assert opening == alone[: alone.index("## The statistics behind the answer")]
    assert opening.rstrip().endswith(results_page.answer_sentences(quick))
    stats = slice(text.index("## The statistics behind the answer"), text.index("## How it was"))
    assert text[stats] == alone[alone.index("## The statistics behind") : alone.index("## How it")]
    # the section's table and answer are the full scale's records' own, not pooled with quick's
    table = results_page.answer_table(full)
    assert "\n".join(table) in section and results_page.answer_sentences(full) in section
    own = results_page.answer_rows(full)[-1]
    assert own["label"] == "all σ" and own["n"] == 9
    assert f"| **all σ** | 9 | {own['base_mse']:.4f} | {own['other_mse']:.4f} |" in section
    pooled = results_page.answer_rows(quick + full)[-1]
    assert pooled["n"] == 21 and f"{pooled['adj']['mean']:+.4f}" not in section
    assert f"{own['adj']['mean']:+.4f}" in section
    assert "Undefended (`none`, n=3): clean test accuracy 0.871 ± 0.004, defended 0.870" in section
    assert "Undefended check (`none`, n=3)" in section  # its attack against the mean image
    assert "19 of 21 runs of its grid finished." in section
    # the paper's comparison at equal σ, one row per σ of this scale's own pairs
    assert "\n".join(results_page.same_sigma_section(full)) in section
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| 0.")] == [
        "| 0.1",
        "| 0.2",
        "| 0.4",
    ]
    # its plot, beside the page, embedded in the section
    assert "![privacy-utility at cifar_full](results_cifar_full_privacy_utility.png)" in section
    drawn = (tmp_path / "docs" / "results_cifar_full_privacy_utility.png").read_bytes()
    assert drawn[:4] == b"\x89PNG" and len(drawn) > 1000
    # how it was made: both studies' sweeps, the page's command with its --scale_root
    how = text[text.index("```bash") :]
    assert f"python -m experiments.sweep --study={study} --root={big} --collect_only\n" in how
    assert f"python -m experiments.sweep ... --root={root} --collect_only\n" in how
    assert f"python -m experiments.results_page --root={root} --scale_root={big} --out={out}" in how
    assert f"At preset `cifar_full` (`{big}`):" in text
    assert "Which CEM at this scale" not in text  # no other CEM setting ran at this scale


def test_a_scale_with_a_weaker_cem_setting_reads_it_by_the_default_rule(tmp_path):
    """Issue 36 point 4: a weaker CEM setting run at the full scale is read against that scale's
    default runs, paired by seed at equal accuracy on that scale's noise line, by the rule that
    chose the default (beyond twice the pairs' spread); computed independently with numpy."""
    import numpy as np

    rng = np.random.default_rng(11)
    quick = _paired_study(rng)
    full = _paired_study(rng, excess=0.004)[:4] + [_undefended(3)]  # σ 0.05 and 0.1 pairs
    default = next(r for r in full if r["name"] == "cem_noise_s0.1")
    default.update(lambd=0.32, cem_loss={"mode": "reference", "schedule": "inverse_lr"})
    d_acc = np.array(default["metrics"]["defended_acc"]["values"])
    d_mse = np.array(default["metrics"][KEY]["values"])
    # the weaker setting: +1 point of accuracy at every seed and, along the line, ~0.002 less MSE
    # than the default would have there (0.15 per unit of accuracy), so it loses by the rule
    v_acc = d_acc + 0.01
    v_mse = d_mse - 0.15 * 0.01 - 0.002 + 0.0002 * rng.standard_normal(3)
    weak = _seeded(
        "cem_noise [reference_invlr]", "cem_noise_s0.1_l0.1_reference_invlr", 0.1, [1, 2, 3],
        list(v_acc), list(v_mse),
    )  # fmt: skip
    weak.update(lambd=0.1, cem_loss={"mode": "reference", "schedule": "inverse_lr"})
    full.append(weak)
    root = _scale_root(tmp_path / "frontier", quick, "quick", 24, 24)
    big = _scale_root(tmp_path / "full", full, "cifar_full", 12, 21)
    text = results_page.write_page(root, str(tmp_path / "results.md"), scale_roots=[big])
    head = "## At scale: preset `cifar_full`"
    section = text[text.index(head) : text.index("## The statistics behind the answer")]
    assert "### Which CEM at this scale" in section
    assert "against this scale's `cem_noise` (`reference` at λ 0.32 × lr₀/lr)" in section
    # independently: the line through this scale's noise runs only, each pair's difference
    noise = [r for r in full if r["defense"] == "noise"]
    acc = np.concatenate([r["metrics"]["defended_acc"]["values"] for r in noise])
    mse = np.concatenate([r["metrics"][KEY]["values"] for r in noise])
    slope, _ = np.polyfit(acc, mse, 1)
    e = (v_mse - d_mse) - slope * (v_acc - d_acc)
    m, s = e.mean(), e.std(ddof=1)
    assert m < -2 * s  # built to lose beyond twice its spread
    assert (
        "`cem_noise_s0.1_l0.1_reference_invlr` against `cem_noise_s0.1` (3 pair(s)): "
        f"{m:+.4f} ± {s:.4f}, below the default"
    ) in section
    assert (
        "**The default, by that rule:** every variant has 3 pairs or more and none beats the "
        "default beyond twice its spread: the default stays `reference` at λ 0.32 × lr₀/lr."
    ) in section
    # the quick scale's own statistics are untouched by the full scale's variant
    assert "cem_noise_s0.1_l0.1_reference_invlr" not in text[text.index("## The statistics") :]
    # had it won, the sentence names the preset and leaves the package's default to its page
    won = results_page.default_decision(
        [("w", 3, 0.01, 0.001)], default="`reference` at λ 0.32 × lr₀/lr", preset="cifar_full"
    )
    assert won.startswith("**The default, by that rule, at preset `cifar_full`:**")
    assert "at this scale it is a better setting than `reference` at λ 0.32" in won


def test_a_scale_root_with_no_pair_yet_says_so(tmp_path):
    import numpy as np

    root = _scale_root(
        tmp_path / "frontier", _paired_study(np.random.default_rng(9)), "quick", 24, 24
    )
    big = _scale_root(tmp_path / "full", [_undefended(1)], "cifar_full", 1, 21)
    text = results_page.write_page(root, str(tmp_path / "results.md"), scale_roots=[big])
    head = text.index("## At scale: preset `cifar_full`")
    section = text[head : text.index("## The statistics behind the answer")]
    assert "no noise/cem_noise seed pair finished yet: 1 of 21 runs" in section
    assert "| setting |" not in section and "(No answer yet" not in section
    assert "clean test accuracy 0.871, defended 0.870 (one seed)" in section
    # a study not started: no run, no plot, still a page
    empty = _scale_root(tmp_path / "empty", [], "cifar_full", 0, 21)
    text = results_page.write_page(root, str(tmp_path / "results.md"), scale_roots=[empty])
    assert "no noise/cem_noise seed pair finished yet: 0 of 21 runs" in text
    assert "Undefended (`none`): no run finished yet." in text
    assert "![privacy-utility at cifar_full]" not in text


def test_a_scale_lists_every_run_with_its_gain_over_the_mean_image(tmp_path):
    import numpy as np

    noise = _seeded("noise", "noise_s0.1", 0.1, (1, 3), [0.84, 0.83], [0.0094, 0.0091])
    cem = _seeded("cem_noise", "cem_noise_s0.1", 0.1, (3,), [0.81], [0.0172])
    base = {1: 0.0612, 3: 0.0608}
    walls = {("noise_s0.1", 1): 7102.0, ("noise_s0.1", 3): 8059.0, ("cem_noise_s0.1", 3): 7165.0}
    for r in (noise, cem):
        seeds = [x["seed"] for x in r["runs"]]
        vals = [base[s] for s in seeds]
        r["metrics"][results_page.BASELINE_KEY] = {
            "mean": float(np.mean(vals)),
            "std": None,
            "n": len(vals),
            "values": vals,
            "seeds": seeds,
            "flagged": 0,
        }
        for x in r["runs"]:
            x["wall_time_s"] = walls[(r["name"], x["seed"])]
    noise["metrics"]["leakage_bits"] = {
        "mean": 791.0,
        "std": 0.06,
        "n": 2,
        "values": [791.04, 790.96],
        "seeds": [1, 3],
        "flagged": 0,
    }
    table = results_page.runs_table([noise, cem])
    assert table[0].startswith("| run | seed |") and len(table) == 2 + 3
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("noise_s0.1", "1"),
        ("noise_s0.1", "3"),
        ("cem_noise_s0.1", "3"),
    ]
    mses = {("noise_s0.1", 1): 0.0094, ("noise_s0.1", 3): 0.0091, ("cem_noise_s0.1", 3): 0.0172}
    for row in rows:
        name, seed = row[0], int(row[1])
        gain = 10 * np.log10(base[seed] / mses[(name, seed)])  # dB over the mean image
        assert row[4] == f"{mses[(name, seed)]:.4f}" and row[5] == f"{base[seed]:.4f}"
        assert row[6] == f"{gain:+.1f} dB"
        h, rest = divmod(int(walls[(name, seed)]), 3600)
        assert row[8] == f"{h}:{rest // 60:02d}:{rest % 60:02d}"  # h:mm:ss, as a run reports it
        assert row[2] == "-"  # no clean accuracy recorded
    assert [r[7] for r in rows] == ["791.0", "791.0", "-"]  # no certificate for cem's seed
    assert rows[0][3] == "0.840" and rows[2][3] == "0.810"
    assert results_page.runs_table([]) == []
    # on the page: in the scale's section, after its progress line, never in the opening
    root = _scale_root(
        tmp_path / "frontier", _paired_study(np.random.default_rng(9)), "quick", 24, 24
    )
    big = _scale_root(tmp_path / "full", [noise, cem], "cifar_full", 3, 21)
    text = results_page.write_page(root, str(tmp_path / "results.md"), scale_roots=[big])
    head = text.index("## At scale: preset `cifar_full`")
    assert text.index(table[0]) > text.index("3 of 21 runs of its grid finished.", head)
    assert text.count(table[0]) == 1
    assert all(line in text for line in table)


def test_a_scale_roots_first_pair_gets_the_papers_comparison_before_the_answer(tmp_path):
    """One noise / cem_noise pair (too few noise runs for the line at equal accuracy): the section
    says the answer needs more runs, and shows the pair at equal σ, its MSE change in % and its
    accuracy change, computed here by hand."""
    import numpy as np

    root = _scale_root(
        tmp_path / "frontier", _paired_study(np.random.default_rng(9)), "quick", 24, 24
    )
    noise = _seeded("noise", "noise_s0.1", 0.1, [1], [0.8416], [0.0094])
    cem = _seeded("cem_noise", "cem_noise_s0.1", 0.1, [1], [0.8320], [0.0140])
    big = _scale_root(tmp_path / "full", [_undefended(1), noise, cem], "cifar_full", 3, 18)
    text = results_page.write_page(root, str(tmp_path / "results.md"), scale_roots=[big])
    section = text[text.index("## At scale") : text.index("## The statistics behind the answer")]
    assert "(No answer yet: it needs three finished `noise` runs" in section
    row = next(line for line in section.splitlines() if line.startswith("| 0.1 | 1 / 1 |"))
    gain = (0.0140 - 0.0094) / 0.0094  # +49 %
    assert f"MSE {0.0140 - 0.0094:+.4f} ({gain:+.0%}), acc {0.8320 - 0.8416:+.4f}" in row
    assert "1 pair(s): attack MSE +0.0046, one pair; acc -0.0096, one pair" in row
    assert "3 of 18 runs of its grid finished." in section


def test_a_missing_scale_table_is_an_input_error_naming_it(tmp_path, monkeypatch):
    import re
    import types

    import numpy as np

    from cem_jax import errors

    root = _scale_root(
        tmp_path / "frontier", _paired_study(np.random.default_rng(9)), "quick", 24, 24
    )
    out = tmp_path / "docs" / "results.md"
    missing = os.path.join(str(tmp_path / "full"), collect.TABLE_JSON)
    with pytest.raises(errors.InputError, match=re.escape(f"{missing} not found")) as e:
        results_page.write_page(root, str(out), scale_roots=[str(tmp_path / "full")])
    assert "--collect_only" in str(e.value)
    assert not out.exists()  # every table is read before anything is written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / collect.TABLE_JSON).write_text("[1, 2]")
    with pytest.raises(errors.InputError, match="holds no table"):
        results_page.write_page(root, str(out), scale_roots=[str(tmp_path / "full")])
    nothing = os.path.join(str(tmp_path / "nothing"), collect.TABLE_JSON)
    # the command line checks --scale_root as it checks --root, before write_page
    argv = dict(root=root, out=str(out), command=None, machine=None)
    fv = types.SimpleNamespace(**argv, scale_root=[str(tmp_path / "nothing")])
    monkeypatch.setattr(results_page, "FLAGS", fv)
    monkeypatch.setattr(results_page, "write_page", lambda *a: pytest.fail("wrote a page"))
    with pytest.raises(errors.InputError, match=re.escape(f"{nothing} not found")):
        results_page._main(["prog"])
