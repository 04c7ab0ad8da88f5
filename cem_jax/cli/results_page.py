r"""Writes the results page (``docs/results.md`` and its plot) from a finished sweep or study.

    python -m experiments.results_page --root=runs/frontier --out=docs/results.md
    python -m experiments.results_page --root=runs/frontier --scale_root=runs/full --out=docs/results.md

Each ``--scale_root`` (repeatable: a study at another scale, e.g. preset ``cifar_full``) gets its
own section right after the opening's answer (:func:`scale_section`): that scale's answer table,
plot and answer from its own records, beside the opening's and never pooled with it, and, when it
ran other CEM settings, which one is better there by the rule that chose the default.

It reads ``<root>/table.json`` (written by ``experiments.sweep --collect_only``), draws its plots beside
the page (the noise / cem_noise frontier, alone and with the CEM variants; the pairs; every other
defense family three ways) and writes an opening that answers first: a table (:func:`answer_table`:
per σ and pooled, ``cem_noise`` against ``noise`` paired by seed at equal accuracy, and the accuracy
it costs; one preset's records), the frontier plot and the answer in words. Then the statistics
behind it (``scipy.stats``, the ``plots`` extra; jax depends on scipy too): at equal defended
accuracy, the train-time decoder MSE of ``cem_noise`` against ``noise``: every run against a
straight line through the noise runs at its own accuracy, pooled over σ with a t-test that counts
the line's own error, and checked against a quadratic; paired by seed, the way the study is built
(the two defenses at the same σ and seed, each pair's difference at equal accuracy along that line;
also with each seed as one unit); per σ against that line; per σ against the noise frontier
interpolated linearly in accuracy, its spread counting the accuracies' seed spread too; and at the
same σ, unpaired and paired. Then the CEM variants (the default is decided by the paired line
reading), every other family (``X``, ``X`` with CEM's noise, ``cem_X``) with its contrasts, the
table, the commands, the scale, the compute and which commit produced each point.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from cem_jax import storage
from cem_jax.cli import collect, config_flags
from cem_jax.progress import format_duration

try:  # every t-test, p-value and regression on the page is scipy's (jax depends on it too)
    from scipy import stats
except ImportError as e:  # pragma: no cover - jax requires scipy
    raise ImportError(
        "the results page needs scipy for its statistics: pip install 'cem_jax[plots]'"
    ) from e

FLAGS = flags.FLAGS
KEY = "decoder.train_time.mse"


def define_flags() -> list[str]:
    flags.DEFINE_string("root", None, "The sweep's --root (holding table.json).")
    flags.DEFINE_string("out", "docs/results.md", "The page to write; its plot goes beside it.")
    flags.DEFINE_string(
        "command", None, "The sweep command to print on the page (default: a guess)."
    )
    flags.DEFINE_string(
        "machine", None, "What ran the study, in words, for the compute line (e.g. '2-core CPU')."
    )
    flags.DEFINE_multi_string(
        "scale_root",
        [],
        "Repeatable: the --root of a study at another scale (e.g. runs/full, preset cifar_full); "
        "its own preset's answer gets its own section beside the opening's, never pooled with it.",
    )
    return ["root", "out", "command", "machine", "scale_root"]


def frontier_comparison(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> list[dict[str, Any]]:
    """For each ``other`` point: the ``base`` frontier's attack MSE at the same defended accuracy.

    The base frontier is the piecewise-linear curve through its points' mean (accuracy, MSE), sorted
    by accuracy; points outside its accuracy range get ``None``. The spread ``diff_std`` combines
    the point's seed std of MSE, the interpolated seed std of MSE of the two base points around it,
    and what their accuracies' seed stds move the comparison by along the segment (first order):
    with ``base = m0 + (acc − a0)·s``, ``s = (m1 − m0)/(a1 − a0)`` and ``t = (acc − a0)/(a1 − a0)``,
    ``acc_term = |s|·√(σ_acc² + (1 − t)²·σ_a0² + t²·σ_a1²)``. A steep segment (two base points
    of nearly equal accuracy but different MSE) thus gives a wide spread: the frontier there is not
    pinned down by the seeds, and a difference against it is not evidence.

    >>> rec = lambda d, acc, mse, s=0.0: {"defense": d, "name": f"{d}{acc}", "n": 3, "metrics": {
    ...     "defended_acc": {"mean": acc, "std": s}, KEY: {"mean": mse, "std": s}}}
    >>> out = frontier_comparison([rec("noise", 0.3, 0.02), rec("noise", 0.2, 0.04),
    ...                            rec("cem_noise", 0.25, 0.045)])
    >>> round(out[0]["base_mse"], 4), round(out[0]["gain"], 3), out[0]["acc_term"]
    (0.03, 0.5, 0.0)
    """

    def usable(r: dict[str, Any]) -> bool:
        return "defended_acc" in r["metrics"] and KEY in r["metrics"]

    base_pts = sorted(
        (r for r in records if r["defense"] == base and usable(r)),
        key=lambda r: r["metrics"]["defended_acc"]["mean"],
    )
    out = []
    for r in records:
        if r["defense"] != other or not usable(r):
            continue
        acc = r["metrics"]["defended_acc"]["mean"]
        acc_std = r["metrics"]["defended_acc"].get("std") or 0.0
        mse, std = r["metrics"][KEY]["mean"], r["metrics"][KEY].get("std") or 0.0
        row: dict[str, Any] = {
            "family": other,
            "name": r["name"],
            "acc": acc,
            "mse": mse,
            "std": std,
            "n": r["n"],
            "base_mse": None,
        }
        for lo, hi in zip(base_pts, base_pts[1:]):
            a0, a1 = lo["metrics"]["defended_acc"]["mean"], hi["metrics"]["defended_acc"]["mean"]
            if a0 <= acc <= a1 and a1 > a0:
                t = (acc - a0) / (a1 - a0)
                m0, m1 = lo["metrics"][KEY]["mean"], hi["metrics"][KEY]["mean"]
                s0, s1 = lo["metrics"][KEY].get("std") or 0.0, hi["metrics"][KEY].get("std") or 0.0
                row["base_mse"] = (1 - t) * m0 + t * m1
                row["base_std"] = (1 - t) * s0 + t * s1
                row["base_n"] = min(lo["n"], hi["n"])
                row["gain"] = mse / row["base_mse"] - 1.0
                row["diff"] = mse - row["base_mse"]
                sa0 = lo["metrics"]["defended_acc"].get("std") or 0.0
                sa1 = hi["metrics"]["defended_acc"].get("std") or 0.0
                slope = (m1 - m0) / (a1 - a0)
                row["acc_term"] = abs(slope) * math.sqrt(
                    acc_std**2 + ((1 - t) * sa0) ** 2 + (t * sa1) ** 2
                )
                row["diff_std"] = math.sqrt(std**2 + row["base_std"] ** 2 + row["acc_term"] ** 2)
                break
        out.append(row)
    return out


def beyond_twice(delta: float, spread: float) -> int:
    """The page's rule for one difference: ``+1`` when it exceeds twice its spread, ``-1`` when it
    falls below minus twice it, else ``0`` (not distinguishable). Every per-point verdict uses it."""
    return 1 if delta > 2 * spread else -1 if delta < -2 * spread else 0


def _verdict(r: dict[str, Any]) -> str:
    """``higher`` / ``lower`` / ``not distinguishable from`` noise alone, or ``no spread`` (one seed)."""
    if r["n"] < 2 or r.get("base_n", 0) < 2:
        return "one seed on a side, so no spread: not evidence either way yet"
    return _NOISE_WORDS[beyond_twice(r["diff"], r["diff_std"])]


_NOISE_WORDS = {
    1: "higher than noise alone",
    -1: "lower than noise alone",
    0: "not distinguishable from noise alone",
}


def answer(rows: list[dict[str, Any]], other: str = "cem_noise") -> str:
    """The one-paragraph answer, whichever way the numbers go.

    A difference counts when it exceeds twice its spread over seeds; a point or a pair of noise
    points with one seed has no spread and is reported, not counted.
    """
    inside = [r for r in rows if r["base_mse"] is not None]
    if not inside:
        return (
            f"**Not answered yet.** No finished `{other}` point lies inside the accuracy range "
            "spanned by the finished `noise` points, so the two cannot be compared at equal accuracy."
        )
    parts = []
    for r in inside:
        seeded = r["n"] >= 2 and r.get("base_n", 0) >= 2
        spread = f" ± {r['std']:.4f}" if r["n"] >= 2 else ""
        diff = f"{r['diff']:+.4f}" + (f" ± {r['diff_std']:.4f}" if seeded else "")
        parts.append(
            f"`{r['name']}` (accuracy {r['acc']:.3f}, n={r['n']}): attack MSE {r['mse']:.4f}"
            f"{spread} against {r['base_mse']:.4f} for noise alone at that accuracy "
            f"(n={r.get('base_n', '?')}), {r['gain']:+.0%} ({diff}: {_verdict(r)})"
        )
    seeded = [r for r in inside if r["n"] >= 2 and r.get("base_n", 0) >= 2]
    better = sum(beyond_twice(r["diff"], r["diff_std"]) > 0 for r in seeded)
    worse = sum(beyond_twice(r["diff"], r["diff_std"]) < 0 for r in seeded)
    head = (
        f"Point by point, against the noise frontier interpolated between its σ points' means: at "
        f"equal defended accuracy, `{other}` gives a higher train-time decoder MSE than `noise` "
        f"at {better} and a lower one at {worse} of the {len(seeded)} comparable points with at "
        "least two seeds on both sides (a difference counts when it exceeds twice its spread over "
        "seeds: the MSE's on both sides and, through the frontier segment's slope, the "
        f"accuracies'); {len(inside) - len(seeded)} more comparable point(s) have one seed."
    )
    mean_gain = sum(r["gain"] for r in inside) / len(inside)
    head += f" Mean relative change over all {len(inside)}: {mean_gain:+.0%}."
    return head + " " + "; ".join(parts) + "."


def _runs_xy(records: list[dict[str, Any]], defense: str) -> tuple[list[float], list[float]]:
    """Every run of ``defense`` (each seed its own point): (defended accuracies, attack MSEs)."""
    xs: list[float] = []
    ys: list[float] = []
    for r in records:
        m = r["metrics"]
        if r["defense"] != defense or "defended_acc" not in m or KEY not in m:
            continue
        accs, mses = m["defended_acc"].get("values"), m[KEY].get("values")
        if accs and mses and len(accs) == len(mses):
            xs += [float(v) for v in accs]
            ys += [float(v) for v in mses]
    return xs, ys


def excess_over_fit(
    xs: list[float], ys: list[float], cx: list[float], cy: list[float], degree: int = 1
) -> dict[str, Any]:
    """The mean excess of runs ``(cx, cy)`` over a polynomial least-squares fit through ``(xs, ys)``,
    and its t-test, counting the fit's own uncertainty.

    The fit is :func:`numpy.polyfit`'s, with its unscaled coefficient covariance ``(XᵀX)⁻¹``
    (``X`` the design matrix, ``1, x, …, x^degree`` per base run). With ``σ̂² = RSS/(n − k)``
    (``k = degree + 1``) and ``v`` the mean design row of the other runs, the mean residual ``ē``
    has variance ``s²/m + σ̂²·vᵀ(XᵀX)⁻¹v`` (its runs' scatter, the fit's error at their mean
    row). ``t = ē / √(…)``, with Welch–Satterthwaite degrees of freedom from ``m − 1`` and
    ``n − k``; the two-sided p is Student's t's (:func:`t_pvalue`). This is not a textbook test,
    so scipy gives its distribution, not the composition. Needs two other runs and ``n > k``.

    >>> out = excess_over_fit([0.2, 0.3, 0.4, 0.3], [0.03, 0.02, 0.01, 0.021], [0.3, 0.3], [0.03, 0.031])
    >>> round(out["mean"], 4), out["m"], round(out["se_fit"], 6), round(out["t"], 1)
    (0.0102, 2, 0.000306, 17.5)
    """
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    coef, cov = np.polyfit(x, y, degree, cov="unscaled")  # highest power first
    resid = y - np.polyval(coef, x)
    n, k, m = len(x), degree + 1, len(cx)
    s2_fit = float(resid @ resid) / (n - k)
    c = np.asarray(cx, dtype=np.float64)
    res = np.asarray(cy, dtype=np.float64) - np.polyval(coef, c)
    v = np.vander(c, k).mean(axis=0)  # the mean design row, in polyfit's order
    var_fit = s2_fit * float(v @ cov @ v)
    var_runs = float(res.var(ddof=1)) / m
    se2 = var_runs + var_fit
    mean = float(res.mean())
    if se2 <= 0:
        t, df = (math.inf if mean else 0.0), float(m - 1 + n - k)
        p = 0.0 if mean else 1.0
    else:
        t = mean / math.sqrt(se2)
        df = se2**2 / (var_runs**2 / (m - 1) + var_fit**2 / (n - k))
        p = t_pvalue(t, df)
    return {
        "mean": mean,
        "std": float(res.std(ddof=1)),
        "m": m,
        "res": [float(e) for e in res],
        "fit_resid": [float(e) for e in resid],
        "coef": [float(a) for a in coef[::-1]],  # constant term first
        "se": math.sqrt(max(se2, 0.0)),
        "se_fit": math.sqrt(var_fit),
        "t": t,
        "df": df,
        "p": p,
    }


def curvature_check(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> dict[str, Any] | None:
    """The pooled reading's straight-line assumption, checked: a quadratic least-squares fit through
    every ``base`` run instead, the F-test of its curvature term against the line
    (``F = (RSS₁ − RSS₂) / (RSS₂/(n − 3))``, 1 and n − 3 df, p from ``scipy.stats.f.sf``),
    and the ``other`` runs' residuals against the quadratic, pooled (:func:`excess_over_fit`).
    ``None`` with fewer than 5 base runs (4 distinct accuracies) or 2 other runs.

    >>> rec = lambda d, accs, mses: {"defense": d, "metrics": {"defended_acc": {"values": accs},
    ...     KEY: {"values": mses}}}
    >>> xs = [0.2, 0.25, 0.3, 0.35, 0.4]
    >>> out = curvature_check([rec("noise", xs, [x * x for x in xs]),
    ...                        rec("cem_noise", [0.3, 0.3], [0.1, 0.12])])
    >>> round(out["mean"], 4), out["n"], out["p_curvature"] < 1e-6  # exactly quadratic
    (0.02, 2, True)
    """
    xs, ys = _runs_xy(records, base)
    cx, cy = _runs_xy(records, other)
    n = len(xs)
    if n < 5 or len(cx) < 2 or len(set(xs)) < 4:  # a quadratic and a residual to test it by
        return None
    rss1 = float(np.sum(np.square(excess_over_fit(xs, ys, cx, cy, degree=1)["fit_resid"])))
    out = excess_over_fit(xs, ys, cx, cy, degree=2)
    rss2 = float(np.sum(np.square(out["fit_resid"])))
    dof = n - 3
    f = (rss1 - rss2) / (rss2 / dof) if rss2 > 0 else math.inf
    p_f = 0.0 if math.isinf(f) else float(stats.f.sf(f, 1, dof))
    return {
        "n": out["m"],
        "n_base": n,
        "f": f,
        "p_curvature": p_f,
        **{key: out[key] for key in ("mean", "std", "t", "df", "p")},
    }


def line_comparison(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> dict[str, Any] | None:
    """A second, smoother reading: a straight line ``MSE = a + b·accuracy`` fitted (least squares)
    through every ``base`` run (each seed its own point), and each ``other`` point against it.

    Final-epoch accuracy at a small scale moves by points from seed to seed, so neighbouring noise
    points can cross; the line uses all of them at once. The fit is ``scipy.stats.linregress``'s:
    ``slope_se`` is its slope's standard error ``σ̂/√S_xx``; ``resid_std`` (``σ̂``, RSS over
    ``n − 2``) is a single noise run's scatter about the line. ``None`` with fewer than 3 base runs
    or no spread in accuracy.

    >>> rec = lambda d, accs, mses: {"defense": d, "name": d, "n": len(accs), "metrics": {
    ...     "defended_acc": {"mean": sum(accs) / len(accs), "values": accs},
    ...     KEY: {"mean": sum(mses) / len(mses), "values": mses}}}
    >>> out = line_comparison([rec("noise", [0.3, 0.2, 0.1], [0.01, 0.02, 0.03]),
    ...                        rec("cem_noise", [0.25], [0.03])])
    >>> round(out["slope"], 3), round(out["rows"][0]["line_mse"], 4), round(out["rows"][0]["gain"], 2)
    (-0.1, 0.015, 1.0)
    """
    xs, ys = _runs_xy(records, base)
    n = len(xs)
    if n < 3:
        return None
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if np.ptp(x) <= 0:
        return None
    reg = stats.linregress(x, y)
    slope, intercept = float(reg.slope), float(reg.intercept)
    resid = [float(e) for e in y - (intercept + slope * x)]
    resid_std = math.sqrt(float(np.sum(np.square(resid))) / (n - 2))
    coef = {"intercept": intercept, "slope": slope}
    rows = []
    for r in records:
        m = r["metrics"]
        if r["defense"] != other or "defended_acc" not in m or KEY not in m:
            continue
        acc, mse = m["defended_acc"]["mean"], m[KEY]["mean"]
        line = intercept + slope * acc
        res = line_residuals(r, coef)
        accs = [float(v) for v in m["defended_acc"].get("values") or []]
        gains = [
            y / (intercept + slope * x) - 1.0
            for x, y in zip(accs, m[KEY].get("values") or [], strict=False)
            if intercept + slope * x > 0
        ]
        rows.append(
            {
                "name": r["name"],
                "n": r["n"],
                "acc": acc,
                "mse": mse,
                "line_mse": line,
                "gain": mse / line - 1.0 if line > 0 else float("nan"),
                "inside": min(xs) <= acc <= max(xs),
                "res": res,
                "run_gains": gains if len(gains) == len(res) else [],
                "res_mean": float(np.mean(res)) if res else float("nan"),
                "res_std": float(np.std(res, ddof=1)) if len(res) > 1 else None,
                "outside_runs": sum(not (min(xs) <= a <= max(xs)) for a in accs),
            }
        )
    return {
        "slope": slope,
        "intercept": intercept,
        "slope_se": float(reg.stderr),
        "resid_std": resid_std,
        "resid": resid,
        "xy": (xs, ys),
        "other_xy": _runs_xy(records, other),
        "n": n,
        "acc_range": (min(xs), max(xs)),
        "rows": rows,
    }


def _line_verdict(r: dict[str, Any], resid_std: float) -> tuple[str, float | None]:
    """A point's verdict against the line: its mean residual over seeds against twice
    ``√(s² + s_noise²)`` (its seeds' std, one noise run's scatter about the line)."""
    if r["res_std"] is None:
        return "one seed, so no spread: not evidence either way yet", None
    spread = math.sqrt(r["res_std"] ** 2 + resid_std**2)
    return _NOISE_WORDS[beyond_twice(r["res_mean"], spread)], spread


def pooled_line(fit: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every ``other`` run (all σ, all seeds) against the noise line at its own accuracy.

    The residuals' mean is CEM's excess attack MSE over noise alone at equal accuracy, averaged over
    the grid (this assumes the excess is alike across σ; the per-point readings test that). Its
    t-test (:func:`excess_over_fit`) counts the runs' scatter and the line's own error at their
    mean accuracy. ``None`` without two runs.

    >>> rec = lambda d, accs, mses: {"defense": d, "name": d, "n": len(accs), "metrics": {
    ...     "defended_acc": {"mean": sum(accs) / len(accs), "values": accs},
    ...     KEY: {"mean": sum(mses) / len(mses), "values": mses}}}
    >>> fit = line_comparison([rec("noise", [0.2, 0.3, 0.4, 0.3], [0.03, 0.02, 0.01, 0.021]),
    ...                        rec("cem_noise", [0.3, 0.3], [0.03, 0.031])])
    >>> out = pooled_line(fit)
    >>> out["n"], round(out["mean"], 4), round(out["gain"], 2), round(out["t"], 1)
    (2, 0.0102, 0.51, 17.5)
    """
    if fit is None:
        return None
    (xs, ys), (cx, cy) = fit["xy"], fit["other_xy"]
    if len(cx) < 2 or len(xs) < 3:
        return None
    out = excess_over_fit(xs, ys, cx, cy, degree=1)
    gains = [g for r in fit["rows"] for g in r.get("run_gains", [])]
    return {
        "n": out["m"],
        "points": sum(bool(r["res"]) for r in fit["rows"]),
        **{key: out[key] for key in ("mean", "std", "t", "df", "p", "se", "se_fit")},
        "gain": sum(gains) / len(gains) if len(gains) == out["m"] else float("nan"),
        "outside": sum(r.get("outside_runs", 0) for r in fit["rows"]),
    }


def short_answer(
    records: list[dict[str, Any]],
    fit: dict[str, Any] | None,
    *,
    base: str = "noise",
    other: str = "cem_noise",
) -> str:
    """The page's answer in one paragraph: at equal accuracy, does ``other`` give a higher attack
    MSE than ``base``, by how much, with what spread, and at what cost in accuracy.

    It reads the pairs of the same σ and seed first (:func:`paired_differences`, the study's
    design), with the pooled line reading (:func:`pooled_line`) beside it; the verdict (``|t| > 2``)
    is the paired one, and the paragraph says so when the two readings disagree. Without two pairs
    it falls back to the pooled reading alone."""
    pairs, per_sigma = all_seed_pairs(records, base=base, other=other)
    paired = paired_differences(pairs, fit) if fit is not None and len(pairs) >= 2 else None
    pool = pooled_line(fit)

    def verdict(t: float) -> tuple[str, int]:
        if t > 2:
            return f"`{other}` gives a higher attack MSE than `{base}` alone", 1
        if t < -2:
            return f"`{other}` gives a lower attack MSE than `{base}` alone", -1
        return f"`{other}` is not distinguishable from `{base}` alone in attack MSE", 0

    if paired is None or paired["adj"]["t"] is None:
        if pool is None:
            return (
                "**In short: not answered yet** (it needs finished runs of both defenses: "
                f"three `{base}` runs and two `{other}` runs at least, ideally at the same σ and "
                "seeds)."
            )
        word, _ = verdict(pool["t"])
        return (
            f"**In short: at equal accuracy, {word}**: {pool['mean']:+.4f} ± {pool['std']:.4f} "
            f"(mean ± std over its {pool['n']} runs, against the line through the noise runs; "
            f"{pool['gain']:+.0%}), t {pool['t']:+.1f} (p {pool['p']:.2g}). No pair of runs at the "
            "same σ and seed yet. Each reading follows."
        )
    adj, acc = paired["adj"], paired["acc"]
    word, sign = verdict(adj["t"])
    base_mse = sum(p[2] for p in pairs) / len(pairs)
    text = (
        f"**In short: at equal accuracy, {word}**, by {adj['mean']:+.4f} ± {adj['std']:.4f} "
        f"(mean ± std over the {paired['n']} pairs of runs at the same σ and seed, "
        f"{pair_layout(per_sigma)}; "
        f"{adj['mean'] / base_mse:+.0%} of `{base}`'s mean attack MSE "
        f"{base_mse:.4f} over those runs): t {adj['t']:+.1f} (p {adj['p']:.2g})."
    )
    if pool is not None:
        pool_sign = verdict(pool["t"])[1]
        agree = "agrees" if pool_sign == sign else "does not agree"
        text += (
            f" Every `{other}` run against the straight line through every `{base}` run, "
            f"unpaired, {agree}: {pool['mean']:+.4f} ± {pool['std']:.4f} per run "
            f"({pool['gain']:+.0%}), t {pool['t']:+.1f}."
        )
    acc_word = _t_verdict(acc["t"], "higher accuracy", "lower accuracy")
    units = paired["acc_units"]
    by_units = (
        f"; with each seed as one unit t {units['t']:+.1f}, p {units['p']:.2g}"
        if units is not None and units["t"] is not None
        else ""
    )
    text += (
        f" The accuracy it costs: {acc['mean']:+.4f} ± {acc['std']:.4f} per pair "
        f"(t {acc['t']:+.1f}, p {acc['p']:.2g}: {acc_word} at |t| > 2{by_units}). Each reading, "
        "and the checks of its assumptions, follow."
    )
    return text


def by_preset(records: list[dict[str, Any]], default: str | None) -> dict[str | None, list]:
    """The records grouped by the preset they ran (a record's ``preset``, else ``default``: a
    ``table.json`` names one preset for all its rows), in order of first appearance. An answer is
    read within one group: runs of different scales are never paired or pooled.

    >>> groups = by_preset([{"name": "a"}, {"name": "b", "preset": "paper"}], "quick")
    >>> {k: [r["name"] for r in v] for k, v in groups.items()}
    {'quick': ['a'], 'paper': ['b']}
    """
    groups: dict[str | None, list] = {}
    for r in records:
        groups.setdefault(r.get("preset") or default, []).append(r)
    return groups


def answer_rows(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> list[dict[str, Any]]:
    """The answer table's rows, from one scale's records (:func:`by_preset`): one per σ at which
    ``base`` and ``other`` have a pair of runs at the same seed, then, with more than one such σ,
    every pair pooled (``label`` ``"all σ"``). Each row: its pairs' number ``n``, ``base``'s mean
    attack MSE over them, ``other``'s at equal accuracy (that plus the paired excess), and
    :func:`paired_differences`' ``adj`` (the excess at equal accuracy along the line through these
    records' ``base`` runs) and ``acc``, the number of distinct ``seeds`` among its pairs, and the
    same two readings with each seed as one unit (``units``, ``acc_units``: :func:`seed_units`,
    ``None`` below two seeds). Empty without that line or a pair.
    """
    fit = line_comparison(records, base=base, other=other)
    if fit is None:
        return []
    sets = [
        (f"σ {sigma:g}", pairs)
        for sigma, b, o in same_sigma_pairs(records, base=base, other=other)
        if (pairs := seed_pairs(b, o))
    ]
    if len(sets) > 1:
        sets.append(("all σ", [p for _, pairs in sets for p in pairs]))
    rows = []
    for label, pairs in sets:
        pd = paired_differences(pairs, fit)
        assert pd is not None and pd["adj"] is not None
        base_mse = float(np.mean([p[2] for p in pairs]))
        rows.append(
            {
                "label": label,
                "n": pd["n"],
                "base_mse": base_mse,
                "other_mse": base_mse + pd["adj"]["mean"],
                "adj": pd["adj"],
                "acc": pd["acc"],
                "seeds": len(set(pd["seeds"])),
                "units": seed_units(pairs, fit),
                "acc_units": pd["acc_units"],
            }
        )
    return rows


def answer_table(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> list[str]:
    """The page's opening: :func:`answer_rows` of one scale's records as a markdown table and a
    line saying what its columns are."""
    rows = answer_rows(records, base=base, other=other)
    if not rows:
        return [
            f"(No answer yet: it needs three finished `{base}` runs and a `{other}` run at the "
            f"same σ and seed as a `{base}` run.)"
        ]

    def pm(d: dict[str, Any], rel: float | None = None) -> str:
        text = f"{d['mean']:+.4f}" + (f" ± {d['std']:.4f}" if d["std"] is not None else "")
        text += f" ({rel:+.0%})" if rel is not None else ""
        return text + (f", t {d['t']:+.1f}" if d["t"] is not None else ", one pair: no t")

    lines = [
        f"| setting | seed pairs | `{base}` attack MSE | `{other}` attack MSE at equal accuracy "
        f"| CEM's extra attack MSE | accuracy change with CEM |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bold = "**" if r["label"] == "all σ" else ""
        extra = pm(r["adj"], r["adj"]["mean"] / r["base_mse"] if r["base_mse"] else None)
        lines.append(
            f"| {bold}{r['label']}{bold} | {r['n']} | {r['base_mse']:.4f} | {r['other_mse']:.4f} "
            f"| {bold}{extra}{bold} | {pm(r['acc'])} |"
        )
    return lines + [
        "",
        f"Each pair: `{base}` and `{other}` (the same noise with CEM added) at the same σ and "
        "seed. At equal accuracy: each pair's attack MSE change less the noise line's slope times "
        f"its accuracy change (`{other}`'s MSE moved along the line to `{base}`'s accuracy). "
        "± is the std over the pairs; t the paired t-test (the extra MSE's counting the line's "
        "own error), which counts at |t| > 2.",
    ]


def answer_sentences(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> str:
    """The plain answer under the opening table and plot, from the same rows (:func:`answer_rows`):
    the pooled excess at equal accuracy and how many σ agree, then the accuracy cost, each also
    with each seed as one unit where the pairs span several σ. Pairs that all share one seed (a
    study's first seed, run at several σ) are not an answer yet: their t counts them as
    independent, and they share that seed's initialisation and batch order."""
    rows = answer_rows(records, base=base, other=other)
    if not rows:
        return ""
    pooled, per_sigma = rows[-1], [r for r in rows if r["label"] != "all σ"]
    adj, acc = pooled["adj"], pooled["acc"]
    if adj["t"] is None:
        return (
            f"**The answer: not yet.** One pair of runs: `{other}` {adj['mean']:+.4f} attack MSE "
            f"at equal accuracy, accuracy {acc['mean']:+.4f}; a test needs two pairs."
        )
    if pooled["seeds"] < 2:
        return (
            f"**The answer: not yet.** Every pair is one seed's ({pooled['n']} pairs at "
            f"{len(per_sigma)} σ): `{other}` {adj['mean']:+.4f} "
            f"({adj['mean'] / pooled['base_mse']:+.0%}) attack MSE at equal accuracy (t "
            f"{adj['t']:+.1f}), accuracy {acc['mean']:+.4f} per pair (t {acc['t']:+.1f}); these t "
            "count the pairs as independent, but they share the seed's initialisation and batch "
            "order. An answer needs pairs from two seeds or more."
        )
    several = len(per_sigma) > 1
    units, acc_units = pooled["units"], pooled["acc_units"]

    def per_seed(u: dict[str, Any] | None) -> str:
        if not several or u is None or u["t"] is None:
            return ""
        return f"; with each seed as one unit t {u['t']:+.1f} over {u['n']} seeds"

    word = _t_verdict(adj["t"], "higher", "lower")
    head = (
        f"`{other}` gives a {word} attack MSE than `{base}` alone"
        if word != "not distinguishable"
        else f"`{other}`'s attack MSE is not distinguishable from `{base}` alone's"
    )
    where = f"{len(per_sigma)} σ" if len(per_sigma) > 1 else pooled["label"]
    text = (
        f"**The answer: at equal accuracy, {head}**: {adj['mean']:+.4f} "
        f"({adj['mean'] / pooled['base_mse']:+.0%}) over {pooled['n']} seed pairs at {where} "
        f"(t {adj['t']:+.1f}{per_seed(units)})"
    )
    tested = [r for r in per_sigma if r["adj"]["t"] is not None]
    if len(per_sigma) > 1 and len(tested) == 1:
        one = tested[0]
        text += (
            f"; {one['label']} alone, the one σ with two pairs or more so far, reads "
            f"{_t_verdict(one['adj']['t'], 'higher', 'lower')} (t {one['adj']['t']:+.1f})"
        )
    elif len(per_sigma) > 1 and tested:
        up = sum(r["adj"]["t"] > 2 for r in tested)
        down = sum(r["adj"]["t"] < -2 for r in tested)
        if up or down:
            text += (
                f"; each σ alone reads higher at {up} and lower at {down} of the {len(tested)} σ "
                "with two pairs or more"
            )
        else:
            text += (
                f"; no σ alone (of the {len(tested)} with two pairs or more) reads a difference "
                "at |t| > 2"
            )
    acc_word = _t_verdict(acc["t"], "higher", "lower")
    cost = (
        f"not distinguishable from no change (t {acc['t']:+.1f}{per_seed(acc_units)})"
        if acc_word == "not distinguishable"
        else f"{acc_word} with CEM (t {acc['t']:+.1f}{per_seed(acc_units)})"
    )
    return text + f". The accuracy change, {acc['mean']:+.4f} per pair, is {cost}."


def pooled_paragraph(
    fit: dict[str, Any] | None, other: str = "cem_noise", curved: dict[str, Any] | None = None
) -> str:
    """The short answer: :func:`pooled_line` in words, with its verdict (``|t| > 2``), and
    ``curved`` (:func:`curvature_check`), if given, as the check of the straight line."""
    pool = pooled_line(fit)
    if pool is None:
        return (
            "**Pooled against the noise line: not answered yet.** It needs at least 3 finished "
            f"noise runs and two finished `{other}` runs."
        )
    if pool["t"] > 2:
        verdict = f"`{other}` gives a higher attack MSE than noise alone at equal accuracy"
    elif pool["t"] < -2:
        verdict = f"`{other}` gives a lower attack MSE than noise alone at equal accuracy"
    else:
        verdict = f"`{other}` is not distinguishable from noise alone at equal accuracy"
    outside = (
        f" ({pool['outside']} of them outside the noise runs' accuracy range: extrapolated)"
        if pool["outside"]
        else ""
    )
    return (
        f"**Pooled against the noise line: {verdict}** (over the grid). Against the straight "
        f"line through all {len(fit['resid'])} noise runs (below), the {pool['n']} `{other}` "
        "runs of "
        f"{pool['points']} σ{outside} lie {pool['mean']:+.4f} ± {pool['std']:.4f} (mean ± std over "
        f"runs) above noise alone at their own accuracy, {pool['gain']:+.0%} on average; the mean "
        f"against its standard error {pool['se']:.4f} (the runs' scatter and the line's own error "
        f"at their mean accuracy, {pool['se_fit']:.4f}): t {pool['t']:+.1f} ({pool['df']:.1f} "
        f"df, Welch–Satterthwaite; p {pool['p']:.2g}); a verdict needs |t| > 2. This assumes "
        "CEM's excess is alike across σ and the noise frontier straight over the accuracies "
        "seen: the per-σ readings below do not assume the first, and the "
        "interpolated one does not assume the second."
    ) + (
        ""
        if curved is None
        else (
            f" Against a quadratic through the noise runs instead (its curvature against the line: "
            f"F {curved['f']:.2f}, p {curved['p_curvature']:.2g}), the same runs lie "
            f"{curved['mean']:+.4f} ± {curved['std']:.4f} above it: t {curved['t']:+.1f} "
            f"({curved['df']:.1f} df, p {curved['p']:.2g})."
        )
    )


def _usable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid points with both a defended accuracy and an attack MSE."""
    return [r for r in records if "defended_acc" in r["metrics"] and KEY in r["metrics"]]


def variant_defaults(
    records: list[dict[str, Any]], default: str = "cem_noise"
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(variant point, default point at its σ)`` for every ``default`` variant (``"<default>
    [...]"``) whose σ the default ran, sorted by the variant's name."""
    usable = _usable(records)
    defaults = {r.get("sigma"): r for r in usable if r["defense"] == default}
    variants = (r for r in usable if r["defense"].startswith(default + " ["))
    return [
        (v, defaults[v.get("sigma")])
        for v in sorted(variants, key=lambda r: r["name"])
        if v.get("sigma") in defaults
    ]


def cem_label(row: dict[str, Any]) -> str:
    """How a CEM point trained, for the page: ``"`gmm` at λ 1"``, ``"`reference` at λ 0.32 × lr₀/lr"``
    (its recorded ``cem_loss`` and λ); the point's name when the table predates ``cem_loss``.

    >>> cem_label({"name": "p", "lambd": 1.0, "cem_loss": {"mode": "gmm", "schedule": "constant"}})
    '`gmm` at λ 1'
    """
    loss = row.get("cem_loss")
    if not loss or row.get("lambd") is None:
        return f"`{row['name']}`"
    scaled = " × lr₀/lr" if loss.get("schedule") == "inverse_lr" else ""
    return f"`{loss.get('mode')}` at λ {row['lambd']:g}{scaled}"


def default_label(records: list[dict[str, Any]], default: str = "cem_noise") -> str:
    """:func:`cem_label` of the default points the variants are paired with (joined if several σ
    trained differently)."""
    labels = dict.fromkeys(cem_label(d) for _, d in variant_defaults(records, default))
    return " / ".join(labels) or f"`{default}`"


def same_sigma_pairs(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
    """``(σ, base point, other point)`` for every σ that both defenses ran, by σ."""
    usable = _usable(records)
    bases = {r.get("sigma"): r for r in usable if r["defense"] == base}
    return sorted(
        ((r.get("sigma"), bases[r.get("sigma")], r) for r in usable
         if r["defense"] == other and r.get("sigma") in bases),
        key=lambda p: p[0] or 0.0,
    )  # fmt: skip


def all_seed_pairs(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> tuple[list[tuple[Any, float, float, float, float]], list[tuple[float, int]]]:
    """Every pair of runs of ``base`` and ``other`` at the same σ and seed (:func:`seed_pairs` over
    :func:`same_sigma_pairs`), and ``(σ, its number of pairs)`` for each σ that has one."""
    per_sigma = [
        (sigma, seed_pairs(b, o))
        for sigma, b, o in same_sigma_pairs(records, base=base, other=other)
    ]
    pairs = [p for _, sigma_pairs in per_sigma for p in sigma_pairs]
    return pairs, [(sigma, len(sigma_pairs)) for sigma, sigma_pairs in per_sigma if sigma_pairs]


def pair_layout(counts: list[tuple[float, int]]) -> str:
    """How the pairs fall over σ (``counts`` from :func:`all_seed_pairs`), in words:
    ``"4 σ × 3 seeds"`` when every σ has as many, else the common count and the exceptions
    (``"4 σ, 3 seeds each and 4 at σ 0.1"``).
    """
    if not counts:
        return "no σ"
    ns = [n for _, n in counts]
    common = max(set(ns), key=lambda n: (ns.count(n), n))
    plural = "seed" if common == 1 else "seeds"
    if all(n == common for n in ns):
        return f"{len(counts)} σ × {common} {plural}"
    rest = " and ".join(f"{n} at σ {sigma:g}" for sigma, n in counts if n != common)
    return f"{len(counts)} σ, {common} {plural} each and {rest}"


def _t_verdict(t: float | None, up: str, down: str) -> str:
    if t is None:
        return "one pair: no test"
    return up if t > 2 else down if t < -2 else "not distinguishable"


def paired_paragraph(
    records: list[dict[str, Any]],
    fit: dict[str, Any] | None,
    *,
    base: str = "noise",
    other: str = "cem_noise",
) -> str:
    """The answer read the way the study was designed: ``other`` against ``base`` at the same σ
    and seed (:func:`paired_differences` over every such pair, pooled over σ; verdicts at
    ``|t| > 2``), and with each seed as one unit (:func:`seed_units`). Empty without two pairs."""
    pairs, per_sigma = all_seed_pairs(records, base=base, other=other)
    if fit is None or len(pairs) < 2:
        return ""
    out = paired_differences(pairs, fit)
    adj, acc, mse = out["adj"], out["acc"], out["mse"]
    units = seed_units(pairs, fit)
    acc_units = out["acc_units"]
    corr = out["acc_corr"]
    text = (
        f"**Paired by seed** (how the study is built: a seed fixes the training subset, the "
        f"initialisation, the batch order and every noise draw, so `{base}` and `{other}` at the "
        f"same σ and seed share most of that seed's accuracy swing"
        + (f"; their accuracies correlate {corr:.2f} over the pairs" if corr is not None else "")
        + f"). Over the {out['n']} pairs of {len(per_sigma)} σ, adding CEM changes the attack MSE by "
        f"{mse['mean']:+.4f} ± {mse['std']:.4f} (mean ± std over pairs) and the defended accuracy "
        f"by {acc['mean']:+.4f} ± {acc['std']:.4f} (t {acc['t']:+.1f}, {acc['df']:.0f} df, "
        f"p {acc['p']:.2g}: "
        + _t_verdict(acc["t"], "higher accuracy", "lower accuracy")
        + "); at equal accuracy (each pair's MSE change less the noise line's slope times its "
        f"accuracy change) {adj['mean']:+.4f} ± {adj['std']:.4f}, standard error {adj['se']:.4f} "
        f"(the slope's own error {adj['se_slope']:.4f} in it): t {adj['t']:+.1f} "
        f"({adj['df']:.1f} df, p {adj['p']:.2g}): "
        + _t_verdict(adj["t"], "higher", "lower")
        + " attack MSE than noise alone."
    )
    if units is not None and acc_units is not None and units["t"] is not None:
        text += (
            f" With each seed as one unit instead (its mean over σ; pairs at different σ share a "
            f"seed's training subset, so they need not be independent): {units['mean']:+.4f} ± "
            f"{units['std']:.4f} over {units['n']} seeds at equal accuracy, t {units['t']:+.1f} "
            f"({units['df']:.0f} df, p {units['p']:.2g}); accuracy {acc_units['mean']:+.4f} ± "
            f"{acc_units['std']:.4f}, t {acc_units['t']:+.1f} (p {acc_units['p']:.2g})."
        )
    return text


def _paired_cell(pd: dict[str, Any] | None) -> str:
    """One paired contrast (:func:`paired_differences`) in words; per point, a difference counts
    beyond twice its spread over pairs (a single pair's), like every per-point verdict here."""
    if pd is None:
        return "no seed in common"
    main = pd["adj"] or pd["mse"]
    what = "at equal accuracy" if pd["adj"] else "attack MSE"

    def word(d: dict[str, Any], up: str, down: str) -> str:
        if d["std"] is None:
            return "one pair"
        return {1: up, -1: down, 0: "not distinguishable"}[beyond_twice(d["mean"], d["std"])]

    pm = lambda d: f"{d['mean']:+.4f}" + (f" ± {d['std']:.4f}" if d["std"] is not None else "")
    text = f"{pd['n']} pair(s): {what} {pm(main)}"
    if main["t"] is not None:
        text += f" (t {main['t']:+.1f}, p {main['p']:.2g})"
    text += f", {word(main, 'higher', 'lower')}; acc {pm(pd['acc'])}"
    return text + f", {word(pd['acc'], 'higher', 'lower')}"


def line_paragraph(fit: dict[str, Any] | None, other: str = "cem_noise") -> str:
    if fit is None or not fit["rows"]:
        return "(The straight-line reading needs at least 3 finished noise runs and one cem_noise run.)"
    lo, hi = fit["acc_range"]
    parts = []
    counts = {"higher than noise alone": 0, "lower than noise alone": 0}
    seeded = 0
    for r in fit["rows"]:
        where = "" if r["inside"] else ", outside the noise runs' accuracy range: extrapolated"
        z = (r["mse"] - r["line_mse"]) / fit["resid_std"] if fit["resid_std"] > 0 else float("nan")
        verdict, spread = _line_verdict(r, fit["resid_std"])
        if spread is not None:
            seeded += 1
            counts[verdict] = counts.get(verdict, 0) + 1
        res = f"residual {r['res_mean']:+.4f}" + (
            f" ± {r['res_std']:.4f}, spread {spread:.4f}" if spread is not None else ""
        )
        parts.append(
            f"`{r['name']}` (n={r['n']}, accuracy {r['acc']:.3f}{where}): {r['mse']:.4f} against "
            f"{r['line_mse']:.4f}, {r['gain']:+.0%} ({z:+.1f} noise-run residual std; {res}: "
            f"{verdict})"
        )
    return (
        f"A second reading, less sensitive to one seed's accuracy: a straight line through all "
        f"{fit['n']} noise runs (attack MSE = {fit['intercept']:.4f} {fit['slope']:+.4f} × "
        f"accuracy, accuracy {lo:.3f}–{hi:.3f}, a single run's scatter about it "
        f"{fit['resid_std']:.4f}). Each `{other}` seed is read against it at its own accuracy (its "
        "residual), and a point counts when its mean residual exceeds twice the spread √(its "
        "seeds' std² + a noise run's scatter²): higher at "
        f"{counts['higher than noise alone']} and lower at {counts['lower than noise alone']} of "
        f"the {seeded} points with two seeds. " + "; ".join(parts) + "."
    )


def same_sigma_section(
    records: list[dict[str, Any]],
    *,
    base: str = "noise",
    other: str = "cem_noise",
    fit: dict[str, Any] | None = None,
) -> list[str]:
    """``other`` against ``base`` at the same σ (same noise, CEM added): the attack MSE's and the
    accuracy's differences (:func:`family_contrast`), and how much of the MSE's the accuracy's alone
    would give along the noise line (``fit``, :func:`line_comparison`'s; fitted here when not
    given). Empty without a σ that both have."""
    pairs = same_sigma_pairs(records, base=base, other=other)
    if not pairs:
        return []
    fit = fit or line_comparison(records, base=base, other=other)
    slope = fit["slope"] if fit else None
    lines = [
        f"At the same σ (the same noise, CEM added; the paper's comparison), `{other}` against "
        f"`{base}`, each difference with its spread √(s₁² + s₂²) over seeds, and paired by seed "
        "(each seed's difference, mean ± std over the pairs; at equal accuracy: less the noise "
        "line's slope times the accuracy difference):",
        "",
        f"| σ | n ({base} / {other}) | `{other}` against `{base}` | paired by seed |",
        "|---|---|---|---|",
    ]
    for sigma, b, o in pairs:
        cell = _contrast_cell(family_contrast(b, o), slope)
        paired = _paired_cell(paired_differences(seed_pairs(b, o), fit))
        lines.append(f"| {sigma:g} | {b['n']} / {o['n']} | {cell} | {paired} |")
    return lines


def db_over(base: float | None, mse: float | None) -> str:
    """The attack's gain over the mean-image baseline, ``10·log10(base / mse)`` as ``"+8.3 dB"``
    ("-" unless both MSEs are positive).

    >>> db_over(0.0612, 0.0091), db_over(None, 0.0091)
    ('+8.3 dB', '-')
    """
    if not base or not mse or base <= 0 or mse <= 0:
        return "-"
    return f"{10 * math.log10(base / mse):+.1f} dB"


def undefended_line(records: list[dict[str, Any]]) -> str:
    """The sanity check every privacy number needs: the attacker against no defense at all."""
    none = [r for r in records if r["defense"] == "none" and KEY in r["metrics"]]
    if not none:
        return (
            "**Undefended check: not run yet.** Without a `none` run, nothing shows that this "
            "attacker beats the mean-image baseline by a wide margin."
        )
    m = none[0]["metrics"]
    base = m.get("decoder.train_time.baseline_mse") or {}
    psnr = m.get("decoder.train_time.psnr") or {}
    gain = ""
    if base.get("mean"):
        # by the MSE ratio; a run's report gives the gain of the mean per-image PSNR, which differs
        gain = f", {db_over(base['mean'], m[KEY]['mean'])} over the mean image (10·log10 of the MSE ratio)"
    return (
        f"Undefended check (`none`, n={none[0]['n']}): the converged decoder attack reaches MSE "
        f"{m[KEY]['mean']:.4f} (PSNR {psnr.get('mean', float('nan')):.2f} dB) against the mean "
        f"image's {base.get('mean', float('nan')):.4f}{gain}."
    )


def variants_section(records: list[dict[str, Any]], fit: dict[str, Any] | None = None) -> list[str]:
    """Which CEM: every ``cem_noise`` variant (loss mode, λ schedule, λ) against the noise frontier
    (and against ``fit``, :func:`line_comparison`'s line, fitted here when not given)."""
    families = sorted({r["defense"] for r in records if r["defense"].startswith("cem_noise")})
    lines = [
        "| variant | point | n | defended acc | attack MSE | noise alone at that acc | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam in families:
        for r in frontier_comparison(records, other=fam):
            base = (
                "outside the noise frontier"
                if r["base_mse"] is None
                else f"{r['base_mse']:.4f} (n={r.get('base_n', '?')})"
            )
            change = "-" if r["base_mse"] is None else f"{r['gain']:+.0%}"
            spread = f" ± {r['std']:.4f}" if r["n"] >= 2 else ""
            lines.append(
                f"| {fam} | {r['name']} | {r['n']} | {r['acc']:.3f} | {r['mse']:.4f}{spread} | "
                f"{base} | {change} |"
            )
    if len(lines) <= 2:
        return ["(no finished cem_noise run yet)"]
    return lines + ["", variants_verdict(records), "", variants_line_verdict(records, fit=fit)]


def _versus_default(delta: float, spread: float) -> str:
    """A variant's difference from the default, counted beyond twice its spread."""
    sign = beyond_twice(delta, spread)
    if sign:
        return "beats the default" if sign > 0 else "below the default"
    ratio = f" ({abs(delta) / spread:.1f}× the spread)" if spread > 0 else ""
    return "not distinguishable from the default" + ratio


def _against_default(rows: list[tuple[str, str, float, float, bool, str]]) -> str:
    """The variants' parts and the closing count, from ``(name, text, delta, spread, seeded, note)``
    rows: ``seeded`` rows are judged by :func:`_versus_default`, the others reported, not counted;
    ``note`` (may be empty) follows the judgement and does not change it."""
    parts: list[str] = []
    better: list[str] = []
    seeded = 0
    for name, text, delta, spread, ok, note in rows:
        if not ok:  # no spread to show
            parts.append(f"{text}: {delta:+.4f}, one seed on a side: not evidence yet{note}")
            continue
        seeded += 1
        word = _versus_default(delta, spread)
        if beyond_twice(delta, spread) > 0:
            better.append(name)
        parts.append(f"{text}: {delta:+.4f} ± {spread:.4f}, {word}{note}")
    tail = (
        f" Beats the default: {', '.join(f'`{b}`' for b in better)}."
        if better
        else f" None of the {seeded} variant(s) with two seeds on each side beats the default."
    )
    return "; ".join(parts) + "." + tail


def line_residuals(record: dict[str, Any], fit: dict[str, Any]) -> list[float]:
    """Each seed's attack MSE minus the noise line's at that seed's own accuracy.

    >>> rec = {"metrics": {"defended_acc": {"values": [0.3, 0.2]}, KEY: {"values": [0.03, 0.03]}}}
    >>> [round(v, 4) for v in line_residuals(rec, {"intercept": 0.05, "slope": -0.1})]
    [0.01, 0.0]
    """
    m = record["metrics"]
    accs, mses = m["defended_acc"].get("values") or [], m[KEY].get("values") or []
    if len(accs) != len(mses):
        return []
    return [y - (fit["intercept"] + fit["slope"] * x) for x, y in zip(accs, mses, strict=True)]


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p of Student's t with ``df`` degrees of freedom, ``2·P(T_df > |t|)``
    (``scipy.stats.t.sf``): for the t's the page composes itself (a fitted line's error in the
    standard error, Welch–Satterthwaite df), whose distribution is still Student's.

    >>> round(t_pvalue(2.0, 10.0), 4)
    0.0734
    """
    return float(2 * stats.t.sf(abs(t), df))


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t-test of ``mean(a) − mean(b)`` (``scipy.stats.ttest_ind``, ``equal_var=False``):
    ``(t, Welch–Satterthwaite degrees of freedom, two-sided p)``. Needs two values on each side.

    >>> t, df, p = welch([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    >>> round(t, 4), round(df, 1), round(p, 3)
    (1.2247, 4.0, 0.288)
    """
    if np.var(a) + np.var(b) == 0:  # no spread on either side: scipy's precision warning
        same = np.mean(a) == np.mean(b)
        return (0.0 if same else math.inf), float(len(a) + len(b) - 2), (1.0 if same else 0.0)
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.df), float(res.pvalue)


def by_seed(record: dict[str, Any], key: str) -> dict[Any, float]:
    """``{seed: value}`` of one metric of a grid point: from the metric's ``seeds`` (tables collected
    since they carry it) or, when every run has the metric, from the runs' order; ``{}`` otherwise.

    >>> by_seed({"metrics": {KEY: {"values": [0.02, 0.03], "seeds": [1, 3]}}}, KEY)
    {1: 0.02, 3: 0.03}
    """
    m = record["metrics"].get(key) or {}
    vals = m.get("values") or []
    seeds = m.get("seeds")
    if seeds is None:
        runs = record.get("runs") or []
        if len(runs) != len(vals):
            return {}
        seeds = [run.get("seed") for run in runs]
    return {s: float(v) for s, v in zip(seeds, vals, strict=True) if s is not None}


def one_sample_t(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the one-sample t-test of ``mean = 0`` (``scipy.stats.ttest_1samp``:
    ``t = x̄/(s/√n)``, ``n − 1`` df, two-sided p); ``t``/``p`` ``None`` below two values.

    >>> out = one_sample_t([1.0, 2.0, 3.0])
    >>> out["mean"], out["std"], round(out["t"], 3), round(out["p"], 4)
    (2.0, 1.0, 3.464, 0.0742)
    """
    return _t_summary(values, lambda: stats.ttest_1samp(values, 0.0))


def paired_t(a: list[float], b: list[float]) -> dict[str, Any]:
    """The paired t-test of ``b − a`` (``scipy.stats.ttest_rel(b, a)``), with the differences'
    mean and sample std, as :func:`one_sample_t` returns them.

    >>> out = paired_t([1.0, 2.0, 4.0], [2.0, 4.0, 7.0])
    >>> out["mean"], out["std"], round(out["t"], 3), round(out["p"], 4)
    (2.0, 1.0, 3.464, 0.0742)
    """
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    return _t_summary(diffs, lambda: stats.ttest_rel(b, a))


def _t_summary(values: list[float], test: Any) -> dict[str, Any]:
    """``{n, mean, std, t, df, p}`` of ``values`` with ``test()``'s t, df and p (a scipy t-test of
    their mean against 0); ``t``/``p`` ``None`` below two values, and without spread ``t`` is
    ``±inf`` (``p`` 0) or 0 (``p`` 1), where scipy would warn of its precision."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "t": None, "df": None, "p": None}
    std = float(np.std(values, ddof=1))
    if std == 0:
        t, p = (math.copysign(math.inf, mean) if mean else 0.0), (0.0 if mean else 1.0)
    else:
        res = test()
        t, p = float(res.statistic), float(res.pvalue)
    return {"n": n, "mean": mean, "std": std, "t": t, "df": float(n - 1), "p": p}


def paired_differences(
    pairs: list[tuple[Any, float, float, float, float]], fit: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Two arms paired by seed: ``pairs`` of ``(seed, acc_a, mse_a, acc_b, mse_b)``; ``b − a``.

    The study's design pairs its runs: a seed fixes the training subset, the initialisation, the
    batch order and every noise draw (``train.py`` folds all keys from it), so two defenses run at
    the same seed share most of that seed's accuracy swing, and their difference seed by seed
    removes it. Returns the attack MSE's and the accuracy's paired t-tests (:func:`paired_t`,
    ``scipy.stats.ttest_rel``), the Pearson correlation of the two arms' accuracies over the pairs,
    and, with ``fit`` (the noise line, :func:`line_comparison`), the difference *at equal
    accuracy*: each pair's MSE difference less the line's slope ``b`` times its accuracy
    difference, ``e_k = ΔMSE_k − b·Δacc_k``. Its t-test is not a textbook one, as it counts the
    slope's own error: ``var(ē) = s_e²/n + (Δacc̄)²·se(b)²`` (``se(b) = σ̂/√S_xx``, the
    regression's standard error of the slope, ``fit["slope_se"]``), Welch–Satterthwaite degrees of
    freedom from ``n − 1`` and ``N − 2``, p from Student's t (:func:`t_pvalue`). Pairs are taken
    as independent: pooling pairs
    of several σ that share a seed, :func:`seed_units` is the check that does not. ``None`` without
    a pair.

    >>> pairs = [(1, 0.30, 0.010, 0.29, 0.020), (2, 0.35, 0.008, 0.35, 0.017),
    ...          (3, 0.25, 0.014, 0.24, 0.025)]
    >>> out = paired_differences(pairs)
    >>> round(out["mse"]["mean"], 4), round(out["acc"]["mean"], 4), round(out["acc_corr"], 3)
    (0.01, -0.0067, 0.999)
    """
    if not pairs:
        return None
    _, acc_a, mse_a, acc_b, mse_b = (list(col) for col in zip(*pairs, strict=True))
    d_acc = [b - a for a, b in zip(acc_a, acc_b, strict=True)]
    d_mse = [b - a for a, b in zip(mse_a, mse_b, strict=True)]
    out: dict[str, Any] = {
        "n": len(pairs),
        "seeds": [p[0] for p in pairs],
        "mse": paired_t(mse_a, mse_b),
        "acc": paired_t(acc_a, acc_b),
        "acc_corr": _corr([p[1] for p in pairs], [p[3] for p in pairs]),
        "acc_units": _unit_means(pairs, lambda aa, ma, ab, mb: ab - aa),
        "adj": None,
    }
    if fit is None:
        return out
    slope = fit["slope"]
    adj = one_sample_t([m - slope * a for m, a in zip(d_mse, d_acc, strict=True)])
    var_slope = float(np.mean(d_acc)) ** 2 * fit["slope_se"] ** 2
    if adj["std"] is not None:
        var_pairs = adj["std"] ** 2 / adj["n"]
        se2 = var_pairs + var_slope
        if se2 > 0:
            adj["t"] = adj["mean"] / math.sqrt(se2)
            parts = var_pairs**2 / (adj["n"] - 1) + var_slope**2 / (fit["n"] - 2)
            adj["df"] = se2**2 / parts if parts > 0 else float(adj["n"] - 1)
            adj["p"] = t_pvalue(adj["t"], adj["df"])
        adj["se"] = math.sqrt(se2)
        adj["se_slope"] = math.sqrt(var_slope)
    out["adj"] = adj
    return out


def _corr(a: list[float], b: list[float]) -> float | None:
    """Pearson's correlation (``scipy.stats.pearsonr``); ``None`` below 3 values or without spread."""
    if len(a) < 3 or np.ptp(a) <= 0 or np.ptp(b) <= 0:
        return None
    return float(stats.pearsonr(a, b).statistic)


def seed_pairs(
    a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[Any, float, float, float, float]]:
    """The runs of grid points ``a`` and ``b`` at the seeds both finished, for
    :func:`paired_differences`: ``(seed, acc_a, mse_a, acc_b, mse_b)``, sorted by seed."""
    aa, ma = by_seed(a, "defended_acc"), by_seed(a, KEY)
    ab, mb = by_seed(b, "defended_acc"), by_seed(b, KEY)
    common = set(aa) & set(ma) & set(ab) & set(mb)
    return [(s, aa[s], ma[s], ab[s], mb[s]) for s in sorted(common, key=str)]


def seed_units(
    pairs: list[tuple[Any, float, float, float, float]], fit: dict[str, Any]
) -> dict[str, Any] | None:
    """The pooled paired reading with each seed as one unit: every seed's mean of
    ``ΔMSE − b·Δacc`` over its pairs (one per σ), then :func:`one_sample_t` over the seeds. Pairs
    of different σ that share a seed share its training subset, so they need not be independent;
    this reading does not assume it (and has only ``#seeds − 1`` df). ``None`` below two seeds.

    >>> fit = {"slope": -0.1}
    >>> out = seed_units([(1, 0.3, 0.01, 0.3, 0.02), (1, 0.2, 0.02, 0.2, 0.04),
    ...                   (2, 0.3, 0.01, 0.3, 0.03)], fit)
    >>> out["n"], round(out["mean"], 4)
    (2, 0.0175)
    """
    return _unit_means(pairs, lambda aa, ma, ab, mb: (mb - ma) - fit["slope"] * (ab - aa))


def _unit_means(
    pairs: list[tuple[Any, float, float, float, float]], diff: Any
) -> dict[str, Any] | None:
    """:func:`one_sample_t` over the seeds of each seed's mean ``diff(acc_a, mse_a, acc_b, mse_b)``
    over its pairs; ``None`` below two seeds."""
    units: dict[Any, list[float]] = {}
    for seed, *values in pairs:
        units.setdefault(seed, []).append(diff(*values))
    if len(units) < 2:
        return None
    return one_sample_t([sum(v) / len(v) for v in units.values()])


def variants_line_verdict(
    records: list[dict[str, Any]],
    default: str = "cem_noise",
    fit: dict[str, Any] | None = None,
    preset: str | None = None,
) -> str:
    """The same question read against the straight line through every noise run: each seed's
    residual at its own accuracy, so a seed's accuracy noise moves its baseline with it. Mean ± std
    of the residuals per point; a variant beats the default when its mean is higher by more than
    twice ``√(s_v² + s_d²)`` with at least two seeds on each side.

    That rule compares the seeds' spread, which more seeds do not shrink. Beside it, for
    information only, Welch's t-test on the two means (:func:`welch`), whose standard error does
    shrink with the number of seeds: a small p with no verdict says the mean lead is unlikely to be
    chance while single seeds of the two still overlap. ``fit``: :func:`line_comparison`'s (fitted
    here when not given); ``preset``: the scale read, for :func:`default_decision`'s sentence at a
    scale other than the one that chose the package's default."""
    fit = fit or line_comparison(records)
    if fit is None:
        return "(the straight-line reading needs at least 3 finished noise runs)"

    def summary(res: list[float]) -> tuple[float, float, int]:
        s = collect.stats(res)
        return s["mean"], s["std"] or 0.0, s["n"]

    rows, paired_rows, decision_rows = [], [], []
    for v, d in variant_defaults(records, default):
        res_v = line_residuals(v, fit)
        res_d = line_residuals(d, fit)
        if not res_v or not res_d:
            continue
        (mv, sv, nv), (md, sd, nd) = summary(res_v), summary(res_d)
        text = (
            f"`{v['name']}` {mv:+.4f} ± {sv:.4f} (n={nv}) against `{d['name']}`'s {md:+.4f} ± "
            f"{sd:.4f} (n={nd})"
        )
        seeded = min(nv, nd) >= 2
        note = ""
        if seeded:
            t, df, p = welch(res_v, res_d)
            note = f", Welch t on the means {t:+.1f} ({df:.1f} df, p {p:.2g})"
        rows.append((v["name"], text, mv - md, math.sqrt(sv**2 + sd**2), seeded, note))
        paired = paired_differences(seed_pairs(d, v), fit)
        if paired is not None:
            adj, acc = paired["adj"], paired["acc"]
            ok = adj["std"] is not None
            text = f"`{v['name']}` against `{d['name']}` ({paired['n']} pair(s))"
            note = (
                f" (t {adj['t']:+.1f}, {adj['df']:.1f} df, p {adj['p']:.2g}; accuracy "
                f"{acc['mean']:+.4f} ± {acc['std']:.4f})"
                if ok
                else ""
            )
            paired_rows.append((v["name"], text, adj["mean"], adj["std"] or 0.0, ok, note))
            decision_rows.append((v["name"], paired["n"], adj["mean"], adj["std"]))
    if not rows:
        return "(no variant comparable with the default at the same σ yet)"
    text = (
        "Read against the straight line through every noise run instead, unpaired, for "
        "comparison (each seed's attack MSE "
        "minus the line's at that seed's own accuracy, mean ± std over seeds; the rule compares "
        "the seeds' spread, which more seeds do not shrink, so each comparison also gives Welch's "
        "t-test on the two means, for information: it does not change the verdict): "
        + _against_default(rows)
    )
    if paired_rows:
        text += (
            "\n\n**The reading that decides the default** (docs/default_cem_loss.md): "
            "the same line reading paired by seed, each seed's difference from the default at "
            "that seed, at equal accuracy (the attack MSE difference less the noise line's slope "
            "times the accuracy difference), mean ± std over the pairs. The study pairs its runs "
            "(a seed fixes the subset, the initialisation, the batch order and the noise draws), "
            "so the two arms' seeds move together and √(s_v² + s_d²) above, which takes them as "
            "independent, overstates the spread of their difference; this reading measures that "
            "spread from the pairs, the same rule (beyond twice it, two pairs at least), with the "
            "paired t-test for information: " + _against_default(paired_rows)
        )
        text += "\n\n" + default_decision(
            decision_rows, default=default_label(records, default), preset=preset
        )
    return text


def default_decision(
    rows: list[tuple[str, int, float, float | None]],
    needed: int = 3,
    default: str = "`gmm` at λ 1",
    preset: str | None = None,
) -> str:
    """The README's rule for the default CEM loss, applied to the paired line readings.

    ``rows``: one ``(name, pairs, mean, std)`` per variant, its paired difference from the default at
    equal accuracy (``std`` None for one pair). A variant beats the default when ``mean > 2·std``
    with two pairs at least; the rule is applied once every variant has ``needed`` pairs, and then
    the largest lead among those that beat the default replaces it. Before that the sentence says
    which variants are still short and what the rule would read now, marked as not a decision.
    ``preset``: read at a scale other than the one that chose the package's default (the rule
    then says which setting is better at that preset; changing the default is a decision of its
    own, docs/default_cem_loss.md).
    """
    if not rows:
        return "**The default, by that rule:** no variant has a pair with the default yet."
    short = [name for name, n, _, _ in rows if n < needed]
    beat = sorted(
        ((mean, name, n, std) for name, n, mean, std in rows if n >= 2 and std is not None
         and beyond_twice(mean, std) > 0),
        reverse=True,
    )  # fmt: skip
    lead = ""
    if beat:
        mean, name, n, std = beat[0]
        others = f", the largest of the {len(beat)} that beat it" if len(beat) > 1 else ""
        lead = f"`{name}` (+{mean:.4f} ± {std:.4f} over {n} pairs{others})"
    if short:
        now = (
            f"read now, the largest lead beyond twice its spread is {lead}, not a decision yet"
            if beat
            else "read now, no variant leads it beyond twice its spread"
        )
        return (
            f"**The default, by that rule:** the rule is applied once every variant has {needed} "
            f"pairs; {len(rows) - len(short)} of {len(rows)} have (still short: "
            + ", ".join(f"`{s}`" for s in short)
            + f"). Until then the default stays {default}; {now}."
        )
    if beat:
        at, then = (
            (
                f", at preset `{preset}`",
                f"at this scale it is a better setting than {default} (whether the package's "
                "default follows is decided in docs/default_cem_loss.md).",
            )
            if preset
            else (
                "",
                f"it replaces {default} as the package's default (docs/default_cem_loss.md). A "
                "study that pins its CEM runs keeps comparing the same runs.",
            )
        )
        return (
            f"**The default, by that rule{at}:** every variant has {needed} pairs or more; {lead} "
            f"leads the default by the most, so {then}"
        )
    return (
        f"**The default, by that rule:** every variant has {needed} pairs or more and none beats "
        f"the default beyond twice its spread: the default stays {default}."
    )


def variants_verdict(records: list[dict[str, Any]], default: str = "cem_noise") -> str:
    """Each variant against the default at the same σ, both measured as their excess attack MSE over
    noise alone at their own accuracy (``diff`` of :func:`frontier_comparison`): a variant beats the
    default when its excess is higher by more than twice the spread ``√(s_v² + s_d²)`` with at least
    two seeds on each side.
    """
    sigma_of = {r["name"]: r.get("sigma") for r in records}
    defaults = {
        sigma_of[r["name"]]: r
        for r in frontier_comparison(records, other=default)
        if r["base_mse"] is not None
    }
    families = sorted({r["defense"] for r in records if r["defense"].startswith(default + " [")})
    rows = []
    for fam in families:
        for v in frontier_comparison(records, other=fam):
            d = defaults.get(sigma_of[v["name"]])
            if v["base_mse"] is None or d is None:
                continue
            text = (
                f"`{v['name']}` (n={v['n']}) {v['diff']:+.4f} against the default's "
                f"{d['diff']:+.4f} (n={d['n']})"
            )
            seeded = min(v["n"], v.get("base_n", 0), d["n"], d.get("base_n", 0)) >= 2
            spread = math.sqrt(v["diff_std"] ** 2 + d["diff_std"] ** 2)
            rows.append((v["name"], text, v["diff"] - d["diff"], spread, seeded, ""))
    if not rows:
        return "(no variant comparable with the default at the same σ yet)"
    return (
        f"Against the default (`{default}`: {default_label(records, default)}) at the same σ, "
        "each measured as its excess "
        "attack MSE over the interpolated noise frontier at its own accuracy, unpaired (shown for "
        "comparison; the paired line reading at the end of this section decides the default): a "
        "variant counts when its excess is higher by more than twice the spread with at least two "
        "seeds on each side. " + _against_default(rows)
    )


# ------------------------------------------------------------------------------ the other families
FAMILIES = ("dropout", "topk", "nopeek", "adversarial")
NOISE_VARIANT = "with_noise"  # the study's variant: the pure defense plus the σ that cem_X adds
BASELINE_KEY = "decoder.train_time.baseline_mse"


def family_arms(records: list[dict[str, Any]], family: str) -> dict[str, dict[str, Any] | None]:
    """A defense family's three arms, each the first usable record or ``None``:

    ``pure`` (``X``, no noise), ``noise`` (``X [with_noise]``: X plus the σ that ``cem_X`` adds, no
    CEM) and ``cem`` (``cem_X``: σ noise + X + CEM).
    """

    def first(label: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in records
                if r["defense"] == label and "defended_acc" in r["metrics"] and KEY in r["metrics"]
            ),
            None,
        )

    return {
        "pure": first(family),
        "noise": first(f"{family} [{NOISE_VARIANT}]"),
        "cem": first(f"cem_{family}"),
    }


def _present_families(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(family, arms)`` of every family with at least one finished arm, in :data:`FAMILIES` order."""
    arms = [(f, family_arms(records, f)) for f in FAMILIES]
    return [(f, a) for f, a in arms if any(v is not None for v in a.values())]


def _difference(a: dict[str, Any], b: dict[str, Any], key: str) -> dict[str, Any]:
    """``b − a`` in one metric with its spread ``√(s_a² + s_b²)`` (each a single seed's std, the same
    rule as the noise frontier) and whether it counts (beyond twice the spread, ≥ 2 seeds a side)."""
    ma, mb = a["metrics"][key], b["metrics"][key]
    diff = mb["mean"] - ma["mean"]
    seeded = a["n"] >= 2 and b["n"] >= 2
    spread = math.sqrt((ma.get("std") or 0.0) ** 2 + (mb.get("std") or 0.0) ** 2)
    sign = beyond_twice(diff, spread) if seeded else 0
    return {
        "diff": diff,
        "spread": spread,
        "seeded": seeded,
        "sign": sign,
        "rel": diff / ma["mean"] if ma["mean"] else float("nan"),
    }


def family_contrast(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Arm ``b`` against arm ``a``: the attack MSE's and the defended accuracy's differences.

    >>> rec = lambda acc, mse: {"n": 3, "metrics": {"defended_acc": {"mean": acc, "std": 0.01},
    ...     KEY: {"mean": mse, "std": 0.001}}}
    >>> c = family_contrast(rec(0.35, 0.010), rec(0.33, 0.020))
    >>> round(c["mse"]["rel"], 2), c["mse"]["sign"], c["acc"]["sign"]
    (1.0, 1, 0)
    """
    return {"mse": _difference(a, b, KEY), "acc": _difference(a, b, "defended_acc")}


def _contrast_cell(c: dict[str, Any], slope: float | None = None) -> str:
    """One contrast in words; with ``slope`` (the noise line's, MSE per unit of accuracy) also the
    MSE change the accuracy change alone would give along noise alone's frontier."""
    m, a = c["mse"], c["acc"]
    if not (m["seeded"] and a["seeded"]):
        word = "one seed on a side: no spread yet"
    else:
        word = (
            {1: "higher", -1: "lower", 0: "not distinguishable"}[m["sign"]]
            + " MSE, "
            + {
                1: "higher accuracy",
                -1: "lower accuracy",
                0: "accuracy not distinguishable",
            }[a["sign"]]
        )
    pm = lambda d: f"{d['diff']:+.4f}" + (f" ± {d['spread']:.4f}" if d["seeded"] else "")
    text = f"MSE {pm(m)} ({m['rel']:+.0%}), acc {pm(a)}: {word}"
    if slope is not None:
        text += (
            f" (the accuracy change alone, along the noise line, would give {slope * a['diff']:+.4f}"
            f" of MSE; the rest, {m['diff'] - slope * a['diff']:+.4f}, is not explained by it)"
        )
    return text


def families_section(
    records: list[dict[str, Any]], plot_name: str | None, fit: dict[str, Any] | None = None
) -> list[str]:
    """Every other defense family three ways, the contrasts, and a one-paragraph answer; ``fit``
    (:func:`line_comparison`'s, fitted here when not given) gives each contrast's accuracy share."""
    present = _present_families(records)
    fit = fit or line_comparison(records)
    slope = fit["slope"] if fit else None
    if not present:
        return ["(no run of another defense family finished yet)"]
    labels = {"pure": "{f}", "noise": "{f} [with_noise]", "cem": "cem_{f}"}
    cem_losses = " / ".join(
        dict.fromkeys(
            cem_label(r) for _, arms in present for a, r in arms.items() if a == "cem" and r
        )
    )
    lines = [
        "Each family at its preset (`python -m experiments.run --defense=X`; the table in "
        "`cem_jax/defenses.py`): the pure defense `X` (no noise), `X [with_noise]` (X plus the "
        "Gaussian noise σ = 0.1 that CEM needs, no CEM) and `cem_X` (σ = 0.1 + X + CEM"
        + (f", its CEM loss as these runs trained: {cem_losses}" if cem_losses else "")
        + "). "
        "`cem_X` against `X` is the paper's comparison; against `X [with_noise]` it is what CEM "
        "itself adds. A difference counts when it exceeds twice its spread (√ of the two points' "
        "squared seed standard deviations) with at least two seeds on each side. Each contrast "
        "also says how much of its MSE change its accuracy change alone would give along the "
        "straight line through the noise runs (see the answer above): a defense that buys its "
        "MSE with accuracy moves along that line.",
        "",
    ]
    if plot_name:
        lines += [f"![families]({plot_name})", ""]
    lines += [
        "| family | arm | n | defended acc | attack MSE | over the mean image | "
        "leakage bits (certificate) | noise alone at that acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    contrasts = []
    for f, arms in present:
        for arm, r in arms.items():
            if r is None:
                lines.append(f"| {f} | {labels[arm].format(f=f)} | 0 | not run yet | | | | |")
                continue
            m = r["metrics"]
            gain = db_over(m.get(BASELINE_KEY, {}).get("mean"), m[KEY]["mean"])
            fc = frontier_comparison(records, other=r["defense"])
            noise_at = "outside the noise frontier"
            if fc and fc[0]["base_mse"] is not None:
                noise_at = f"{fc[0]['base_mse']:.4f} ({fc[0]['gain']:+.0%})"
            lines.append(
                f"| {f} | {labels[arm].format(f=f)} | {r['n']} | "
                f"{collect.format_stat(m['defended_acc'], '.3f')} | "
                f"{collect.format_stat(m[KEY], '.4f')} | {gain} | "
                f"{collect.format_stat(m.get('leakage_bits'), '.1f')} | {noise_at} |"
            )
        row: dict[str, Any] = {"family": f}
        if arms["cem"] is not None and arms["pure"] is not None:
            row["vs_pure"] = family_contrast(arms["pure"], arms["cem"])
            row["paired_pure"] = paired_differences(seed_pairs(arms["pure"], arms["cem"]), fit)
        if arms["cem"] is not None and arms["noise"] is not None:
            row["vs_noise"] = family_contrast(arms["noise"], arms["cem"])
            row["paired_noise"] = paired_differences(seed_pairs(arms["noise"], arms["cem"]), fit)
        contrasts.append(row)
    lines += [
        "",
        "| family | `cem_X` against `X` | `cem_X` against `X [with_noise]` (what CEM adds) |",
        "|---|---|---|",
    ]
    for row in contrasts:
        cells = [
            _contrast_cell(row[k], slope) if k in row else "-" for k in ("vs_pure", "vs_noise")
        ]
        lines.append(f"| {row['family']} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "The same contrasts paired by seed (each seed's difference, mean ± std over the pairs; "
        "at equal accuracy: less the noise line's slope times the accuracy difference):",
        "",
        "| family | `cem_X` against `X`, paired | `cem_X` against `X [with_noise]`, paired |",
        "|---|---|---|",
    ]
    for row in contrasts:
        cells = [_paired_cell(row[k]) if k in row else "-" for k in ("paired_pure", "paired_noise")]
        lines.append(f"| {row['family']} | {cells[0]} | {cells[1]} |")
    lines += ["", families_paragraph(contrasts)]
    return lines


def families_paragraph(contrasts: list[dict[str, Any]]) -> str:
    """The families' answer in one paragraph, counted from the contrasts, whichever way it goes."""

    def count(key: str) -> str:
        cs = [r[key] for r in contrasts if key in r and r[key]["mse"]["seeded"]]
        if not cs:
            return "no family has two seeds on both sides yet"
        up = [r["family"] for r in contrasts if key in r and r[key]["mse"]["sign"] > 0]
        down = [r["family"] for r in contrasts if key in r and r[key]["mse"]["sign"] < 0]
        acc = [r["family"] for r in contrasts if key in r and r[key]["acc"]["sign"] < 0]
        name = lambda fs: " (" + ", ".join(fs) + ")" if fs else ""
        return (
            f"the attack MSE is higher in {len(up)}{name(up)} and lower in {len(down)}{name(down)} "
            f"of the {len(cs)} families with two seeds on both sides, and the accuracy lower in "
            f"{len(acc)}{name(acc)}"
        )

    return (
        f"**Other families.** Against the pure defense, `cem_X` (with the σ = 0.1 noise CEM needs): "
        f"{count('vs_pure')}. Against the same defense with that noise and no CEM, i.e. what CEM "
        f"itself adds: {count('vs_noise')}."
    )


def _save_png(fig: Any, path: str) -> None:
    """Writes a matplotlib figure as PNG to ``path`` (local or ``gs://``)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    storage.write_bytes(path, buf.getvalue())


def plot_families(records: list[dict[str, Any]], path: str) -> bool:
    """One panel per defense family: defended accuracy against the train-time decoder MSE for its
    three arms (error bars over seeds), with the noise frontier (grey) and the undefended run for
    scale. Returns ``False`` (writes nothing) when no family has a finished arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    present = _present_families(records)
    if not present:
        return False
    fig = Figure(figsize=(max(3.4 * len(present), 8.0), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(present), sharey=True, squeeze=False)[0]
    noise = sorted(
        (r for r in records if r["defense"] == "noise" and KEY in r["metrics"]),
        key=lambda r: r["metrics"]["defended_acc"]["mean"],
    )
    none = next((r for r in records if r["defense"] == "none" and KEY in r["metrics"]), None)
    style = {"pure": ("C0", "X (the pure defense)"), "noise": ("C1", "X + noise σ 0.1, no CEM")}
    style["cem"] = ("C3", "cem_X (noise σ 0.1 + X + CEM)")
    for ax, (f, arms) in zip(axes, present):
        if noise:
            ax.plot(
                [r["metrics"][KEY]["mean"] for r in noise],
                [r["metrics"]["defended_acc"]["mean"] for r in noise],
                "-o",
                color="0.7",
                ms=3,
            )
        if none is not None:
            m = none["metrics"]
            ax.plot(m[KEY]["mean"], m["defended_acc"]["mean"], "k*", ms=8)
        for arm, r in arms.items():
            if r is None:
                continue
            m, color = r["metrics"], style[arm][0]
            flagged = bool(m[KEY].get("flagged"))
            ax.errorbar(
                m[KEY]["mean"],
                m["defended_acc"]["mean"],
                xerr=m[KEY].get("std") or 0.0,
                yerr=m["defended_acc"].get("std") or 0.0,
                fmt="o",
                color=color,
                markerfacecolor="white" if flagged else color,
                capsize=3,
            )
        ax.set_title(f, fontsize=10)
        ax.set_xlabel("train-time decoder MSE")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", label=label) for c, label in style.values()]
    handles += [
        Line2D([], [], color="0.7", marker="o", ms=3, label="noise alone (σ 0.05–0.8)"),
        Line2D([], [], color="k", marker="*", ls="", ms=8, label="none (undefended)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    axes[0].set_ylabel("defended test accuracy")
    fig.suptitle(
        "each family with and without CEM — mean ± std over seeds\nhollow: attack not converged "
        "or not better than the mean image",
        fontsize=10,
    )
    _save_png(fig, path)
    return True


def pair_panels(
    records: list[dict[str, Any]],
) -> list[tuple[str, list[tuple[str, list[tuple[Any, float, float]]]]]]:
    """The paired contrasts the page reads, as plot data: ``(panel title, [(label, [(seed, Δacc,
    ΔMSE), ...]), ...])`` for (1) ``cem_noise`` against ``noise`` at each σ, (2) each ``cem_noise``
    variant against the default at its σ, (3) each family's ``cem_X`` against ``X`` with the same
    noise and no CEM. Differences are second minus first, pair by pair (:func:`seed_pairs`);
    panels and labels with no pair are left out."""

    def diffs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[Any, float, float]]:
        return [(s, ab - aa, mb - ma) for s, aa, ma, ab, mb in seed_pairs(a, b)]

    families = [(f, a) for f, a in _present_families(records) if a["noise"] and a["cem"]]
    panels = [
        (
            "cem_noise against noise, same σ and seed",
            [(f"σ {s:g}", diffs(b, o)) for s, b, o in same_sigma_pairs(records)],
        ),
        (
            "each variant against the default ("
            + default_label(records).replace("`", "").replace(" at ", ", ")
            + ")",
            [
                (v["name"].removeprefix("cem_noise_"), diffs(d, v))
                for v, d in variant_defaults(records)
            ],
        ),
        (
            "cem_X against X + the same noise, no CEM",
            [(f, diffs(a["noise"], a["cem"])) for f, a in families],
        ),
    ]
    out = [(title, [(lab, d) for lab, d in sets if d]) for title, sets in panels]
    return [(title, sets) for title, sets in out if sets]


def plot_pairs(records: list[dict[str, Any]], fit: dict[str, Any] | None, path: str) -> bool:
    """The paired readings as a picture, one panel per :func:`pair_panels` contrast: each pair of
    runs (same seed) a point at (its attack MSE change, its accuracy change), each set's mean a
    large marker, and the dotted line through the origin along which the noise line moves
    (ΔMSE = b·Δacc, ``b`` the slope of ``fit``). A point to the right of that line has more attack
    MSE than noise alone would give for its accuracy change: the "at equal accuracy" excess is its
    horizontal distance from the line. Returns ``False`` (writes nothing) without a pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = pair_panels(records)
    if not panels:
        return False
    fig = Figure(figsize=(4.6 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, sets) in zip(axes, panels):
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        for i, (label, d) in enumerate(sets):
            color = f"C{i % 10}"
            dacc, dmse = [p[1] for p in d], [p[2] for p in d]
            ax.plot(dmse, dacc, "o", color=color, alpha=0.45, ms=5)
            ax.plot(
                sum(dmse) / len(d), sum(dacc) / len(d), "D", color=color, ms=8, mec="k",
                label=f"{label} (n={len(d)})",
            )  # fmt: skip
        if fit is not None and fit.get("slope"):
            lo, hi = ax.get_ylim()
            ax.plot(
                [fit["slope"] * lo, fit["slope"] * hi], [lo, hi], ":", color="k", lw=1.2,
                label="along the noise line",
            )  # fmt: skip
            ax.set_ylim(lo, hi)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("Δ train-time decoder MSE (second − first)")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("Δ defended test accuracy")
    fig.suptitle(
        "paired by seed: each small dot one pair of runs, each diamond a set's mean; right of the "
        "dotted line = more attack MSE than noise alone gives for that accuracy change",
        fontsize=9,
    )
    _save_png(fig, path)
    return True


def compute_section(
    records: list[dict[str, Any]], machine: str | None, scale: dict[str, Any] | None
) -> list[str]:
    """The scale (the preset's sizes and the attack protocol, from ``table.json``'s ``scale``) and
    the compute (every run's wall time and devices)."""
    runs = [run for r in records for run in r.get("runs", [])]
    if not runs or not scale:
        return ["(no scale in table.json: run the sweep with --collect_only again)"]
    cfg, ds = scale.get("config") or {}, scale.get("dataset") or {}
    walls = sorted(float(x.get("wall_time_s") or 0.0) for x in runs)
    devices = sorted({str(x.get("devices")) for x in runs})
    attack = (
        f"attacks {', '.join(cfg.get('attacks') or [])} ({', '.join(cfg.get('attack_settings') or [])}), "
        f"at most {cfg.get('attack_steps')} steps of batch {cfg.get('attack_batch_size')}, validated "
        f"every {cfg.get('attack_eval_every')} steps, converged after {cfg.get('attack_patience')} "
        f"validations without a {cfg.get('attack_min_improvement')} relative improvement "
        f"({cfg.get('attack_lr_decays')} learning-rate decay(s) first); threat model "
        f"{cfg.get('threat_model', 'server_view')}"
        + (
            " (the attacker's features pass through every obfuscation the server sees)"
            if cfg.get("threat_model", "server_view") == "server_view"
            else " (the official attacker: it simulates the Gaussian noise only)"
        )
    )
    cut = cfg.get("cut_layer")
    if cut is None and cfg.get("arch"):
        from cem_jax.models import default_cut_layer

        try:
            cut = f"{default_cut_layer(cfg['arch'])} (the default)"
        except (KeyError, ValueError):
            cut = "default"
    return [
        f"- Scale: {cfg.get('arch')} cut at layer {cut}, "
        f"{cfg.get('epochs')} epochs of batch {cfg.get('batch_size')} on "
        f"{ds.get('num_train')} training images, accuracy on {ds.get('num_test')} test images; "
        f"{attack}.",
        f"- Compute: {len(runs)} runs, {sum(walls) / 3600:.1f} h of wall time in all, "
        f"{walls[len(walls) // 2] / 60:.1f} min per run (median; train + attack), on "
        f"{', '.join(devices)}" + (f" ({machine})" if machine else "") + ".",
    ]


def _read_table(root: str, flag: str = "--root") -> dict[str, Any]:
    """``<root>/table.json``, checked: returns the table (an object whose ``rows`` is a list).

    Raises :class:`cem_jax.errors.InputError` naming the file when it is missing, unreadable or
    holds no table, and storage's error (naming ``flag``) for a URL it cannot serve.
    """
    from cem_jax import errors

    storage.check(root, flag)
    path = storage.join(root, collect.TABLE_JSON)
    again = "write it again with the sweep's command and --collect_only"
    try:
        table = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise errors.InputError(
            f"{path} not found: run the sweep, then the same command with --collect_only first."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.InputError(f"{path} is unreadable ({e}); {again}.") from None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise errors.InputError(f"{path} holds no table (an object with 'rows'); {again}.")
    return table


def sweep_command(table: dict[str, Any], root: str) -> str:
    """Returns the sweep command that fills ``root``: ``python -m experiments.sweep
    --study=<the table's study> --root=<root>``, with ``...`` for the study when the table names
    none."""
    study = table.get("study")
    return f"python -m experiments.sweep {f'--study={study}' if study else '...'} --root={root}"


def undefended_accuracy_line(records: list[dict[str, Any]]) -> str:
    """Returns one sentence: the clean and defended test accuracy of one scale's undefended
    (``none``) runs, mean ± std over their seeds, and their number (or that none finished yet).

    >>> acc = lambda mean, std: {"mean": mean, "std": std}
    >>> m = {"clean_acc": acc(0.871, 0.004), "defended_acc": acc(0.87, 0.005)}
    >>> print(undefended_accuracy_line([{"defense": "none", "n": 3, "metrics": m}]))
    ... # doctest: +NORMALIZE_WHITESPACE
    Undefended (`none`, n=3): clean test accuracy 0.871 ± 0.004, defended 0.870 ± 0.005
    (mean ± std over seeds).
    """
    none = [r for r in records if r["defense"] == "none" and "defended_acc" in r["metrics"]]
    if not none:
        return "Undefended (`none`): no run finished yet."
    n, m = none[0]["n"], none[0]["metrics"]

    def pm(key: str) -> str:
        d = m.get(key) or {}
        if d.get("mean") is None:
            return "not recorded"
        spread = d.get("std") is not None and n >= 2
        return f"{d['mean']:.3f}" + (f" ± {d['std']:.3f}" if spread else "")

    return (
        f"Undefended (`none`, n={n}): clean test accuracy {pm('clean_acc')}, defended "
        f"{pm('defended_acc')} (" + ("mean ± std over seeds" if n >= 2 else "one seed") + ")."
    )


def _num(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or "-" for none."""
    return "-" if value is None else format(value, spec)


def runs_table(records: list[dict[str, Any]]) -> list[str]:
    """Every finished run of a scale, one row each, in the records' order then by seed: the
    accuracies, the converged train-time decoder's MSE beside the mean image's on the same images
    and its gain over it (``10·log10`` of the MSE ratio), the certificate and the run's recorded
    wall time (training and attacks; a resumed run sums its sittings). ``[]`` without a run.

    >>> rec = {"name": "noise_s0.1", "runs": [{"seed": 2, "wall_time_s": 7102}], "metrics": {
    ...     "defended_acc": {"values": [0.842], "seeds": [2]}, KEY: {"values": [0.0091], "seeds": [2]},
    ...     BASELINE_KEY: {"values": [0.0612], "seeds": [2]}}}
    >>> print(runs_table([rec])[-1])
    | noise_s0.1 | 2 | - | 0.842 | 0.0091 | 0.0612 | +8.3 dB | - | 1:58:22 |
    """
    rows = []
    for r in records:
        cols = {
            key: by_seed(r, key)
            for key in ("clean_acc", "defended_acc", KEY, BASELINE_KEY, "leakage_bits")
        }
        walls = {x.get("seed"): x.get("wall_time_s") for x in r.get("runs") or []}
        for seed in sorted(set(cols["defended_acc"]) | set(cols[KEY])):
            cell = {key: values.get(seed) for key, values in cols.items()}
            mse, base, wall = cell[KEY], cell[BASELINE_KEY], walls.get(seed)
            rows.append(
                f"| {r['name']} | {seed} | {_num(cell['clean_acc'], '.3f')} "
                f"| {_num(cell['defended_acc'], '.3f')} | {_num(mse, '.4f')} "
                f"| {_num(base, '.4f')} | {db_over(base, mse)} | {_num(cell['leakage_bits'], '.1f')} "
                f"| {'-' if wall is None else format_duration(wall)} |"
            )
    if not rows:
        return []
    return [
        "| run | seed | clean accuracy | defended accuracy | attack MSE | mean image's MSE | "
        "over the mean image | certificate (bits) | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def scale_section(
    root: str, table: dict[str, Any], records: list[dict[str, Any]], plot_name: str | None
) -> list[str]:
    """The answer at another scale, beside the opening's and never pooled with it: returns the
    lines of its section, from ``records`` (the ``table``'s own preset's, :func:`by_preset`)
    alone. A heading naming the preset, architecture, epochs and training images; the undefended
    accuracy (:func:`undefended_accuracy_line`) and attack check (:func:`undefended_line`); then
    :func:`answer_table`, the plot ``plot_name`` (if drawn), :func:`answer_sentences`, the
    paper's own comparison at equal σ (:func:`same_sigma_section`: the gain in % and the accuracy
    change, from the first pair on, before the answer at equal accuracy can be read), which CEM
    setting is better at this scale when it ran any other (:func:`scale_variants`) and how many
    of its grid's runs finished, or, with no ``noise`` / ``cem_noise`` seed pair yet, one sentence
    saying so in place of the table."""
    preset = table.get("preset")
    cfg = (table.get("scale") or {}).get("config") or {}
    num_train = ((table.get("scale") or {}).get("dataset") or {}).get("num_train")
    size = (
        f" ({cfg['arch']}, {cfg.get('epochs')} epochs on {num_train} training images)"
        if cfg.get("arch")
        else ""
    )
    progress = f"{table.get('finished')} of {table.get('runs')} runs"
    study = f" (study `{table['study']}`)" if table.get("study") else ""
    undefended = undefended_accuracy_line(records)
    if any(r["defense"] == "none" and KEY in r["metrics"] for r in records):
        undefended += " " + undefended_line(records)
    lines = [
        f"## At scale: preset `{preset}`{size}",
        "",
        f"Read from `{root}`{study} alone: these runs are never paired or pooled with the runs "
        "above.",
        "",
        undefended,
        "",
    ]
    plot = [f"![privacy-utility at {preset}]({plot_name})", ""] if plot_name else []
    table = runs_table(records)
    every = (
        [
            "Every run (the converged train-time decoder attack; over the mean image: 10·log10 "
            "of the ratio of the mean image's MSE to the attack's; wall time: training and "
            "attack as recorded, a resumed run's sittings summed):",
            "",
            *table,
            "",
        ]
        if table
        else []
    )
    if not all_seed_pairs(records)[0]:
        return lines + [
            f"At this scale, no noise/cem_noise seed pair finished yet: {progress} of its grid "
            "finished.",
            "",
            *plot,
            *every,
        ]
    sentences = answer_sentences(records)
    paper = same_sigma_section(records)
    return lines + [
        *answer_table(records),
        "",
        *plot,
        *([sentences, ""] if sentences else []),
        *([*paper, ""] if paper else []),
        *scale_variants(records, preset),
        f"{progress} of its grid finished.",
        "",
        *every,
    ]


def scale_variants(records: list[dict[str, Any]], preset: str | None) -> list[str]:
    """Which CEM at another scale (issue 36, point 4): when the scale's records hold ``cem_noise``
    variants (a weaker λ, ``gmm``, ...), each is read against the scale's own default runs by the
    rule that chose the package's default (:func:`variants_line_verdict`: paired by seed, at equal
    accuracy on this scale's noise line, beyond twice the pairs' spread); ``[]`` without one."""
    if not any(r["defense"].startswith("cem_noise [") for r in records):
        return []
    return [
        "### Which CEM at this scale",
        "",
        f"Each other CEM setting run at preset `{preset}` against this scale's `cem_noise` "
        f"({default_label(records)}), by the rule that chose the package's default at the quick "
        "scale (docs/default_cem_loss.md), on this scale's own noise line:",
        "",
        variants_line_verdict(records, preset=preset),  # fits this scale's noise line itself
        "",
    ]


def write_page(
    root: str,
    out: str,
    command: str | None = None,
    machine: str | None = None,
    scale_roots: Sequence[str] = (),
) -> str:
    """Writes the page ``out`` and its plots beside it from ``<root>/table.json`` and, for each of
    ``scale_roots``, one more scale's section (:func:`scale_section`); returns the page's text.
    Every table is read (:func:`_read_table`) before anything is written."""
    table = _read_table(root)
    scales = [(r, _read_table(r, "--scale_root")) for r in scale_roots]
    records = table["rows"]
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    plot_name, families_plot = f"{stem}_privacy_utility.png", f"{stem}_families.png"
    pairs_plot, variants_plot = f"{stem}_pairs.png", f"{stem}_variants.png"
    preset = table.get("preset")
    # the opening reads one scale: the records of the table's preset, never pooled with another's
    opening = by_preset(records, preset).get(preset, [])
    # the opening's frontier plot: noise, cem_noise and none; with cem_noise's variants for "Which
    # CEM" (the other families get their own)
    frontier = [r for r in records if r["defense"].split(" [")[0] in ("none", "noise", "cem_noise")]
    fit = line_comparison(records)
    line = (fit["intercept"], fit["slope"], *fit["acc_range"]) if fit else None
    title = f"{table.get('dataset')}, preset {preset}"
    try:
        have_plot = collect.plot_privacy_utility(
            [r for r in opening if r["defense"] in ("none", "noise", "cem_noise")],
            os.path.join(folder, plot_name),
            title=title,
            line=line,
        )
        have_variants = any("[" in r["defense"] for r in frontier) and (
            collect.plot_privacy_utility(
                frontier, os.path.join(folder, variants_plot), title=title, line=line
            )
        )
        have_families = plot_families(records, os.path.join(folder, families_plot))
        have_pairs = plot_pairs(records, fit, os.path.join(folder, pairs_plot))
    except ImportError:  # no matplotlib: the sweep's own plot (every family on one figure)
        src = storage.join(root, collect.PLOT_PNG)
        have_plot, have_families, have_pairs = storage.exists(src), False, False
        have_variants = False
        if have_plot:
            with open(os.path.join(folder, plot_name), "wb") as f:
                f.write(storage.read_bytes(src))
    scale_lines: list[str] = []
    scale_how: list[str] = []
    for sroot, stable in scales:
        spreset = stable.get("preset")
        srecords = by_preset(stable["rows"], spreset).get(spreset, [])
        splot = f"{stem}_{spreset}_privacy_utility.png"
        have_splot = False
        if srecords:  # finished runs: their frontier plot, this scale's records only
            sfit = line_comparison(srecords)
            try:
                have_splot = collect.plot_privacy_utility(
                    [r for r in srecords if r["defense"] in ("none", "noise", "cem_noise")],
                    os.path.join(folder, splot),
                    title=f"{stable.get('dataset')}, preset {spreset}",
                    line=(sfit["intercept"], sfit["slope"], *sfit["acc_range"]) if sfit else None,
                )
            except ImportError:  # no matplotlib: that sweep's own plot
                src = storage.join(sroot, collect.PLOT_PNG)
                have_splot = storage.exists(src)
                if have_splot:
                    with open(os.path.join(folder, splot), "wb") as f:
                        f.write(storage.read_bytes(src))
        scale_lines += scale_section(sroot, stable, srecords, splot if have_splot else None)
        scommits = sorted(
            {run.get("commit") or "unrecorded" for r in srecords for run in r.get("runs", [])}
        )
        scale_how += [
            "",
            f"At preset `{spreset}` (`{sroot}`):",
            "",
            *compute_section(srecords, None, stable.get("scale")),
            *([f"- Commits that produced its points: {', '.join(scommits)}."] if scommits else []),
            *(
                [f"- Its finished runs are recorded in `{stable['records']}`, committed too."]
                if stable.get("records")
                else []
            ),
        ]
    rows = frontier_comparison(records)
    same_sigma = same_sigma_section(records, fit=fit)
    if same_sigma:
        same_sigma.append("")
    runs = [run for r in records for run in r.get("runs", [])]
    commits = sorted({run.get("commit") or "unrecorded" for run in runs})
    command = command or sweep_command(table, root)
    page_command = (
        f"python -m experiments.results_page --root={root}"
        + "".join(f" --scale_root={r}" for r, _ in scales)
        + f" --out={out}"
    )
    scale = (table.get("scale") or {}).get("config") or {}
    num_train = ((table.get("scale") or {}).get("dataset") or {}).get("num_train")
    at_scale = (
        f" ({scale['arch']}, {scale.get('epochs')} epochs on {num_train} training images; "
        'scale and compute in "How it was made")'
        if scale.get("arch")
        else ""
    )
    sentences = answer_sentences(opening)
    lines = [
        "# Results: CEM's privacy–utility frontier against noise alone",
        "",
        f"Dataset {table.get('dataset')}, preset `{preset}`{at_scale}; "
        f"{table.get('finished')} of {table.get('runs')} runs of the grid finished.",
        "",
        *answer_table(opening),
        "",
        f"![privacy-utility]({plot_name})" if have_plot else "(no plot: no finished run)",
        "",
        *([sentences, ""] if sentences else []),
        *scale_lines,
        "## The statistics behind the answer",
        "",
        short_answer(records, fit),
        "",
        *([paired, ""] if (paired := paired_paragraph(records, fit)) else []),
        pooled_paragraph(fit, curved=curvature_check(records)),
        "",
        answer(rows),
        "",
        line_paragraph(fit),
        "",
        *same_sigma,
        undefended_line(records),
        "",
        *(
            [
                "## The pairs",
                "",
                "The frontier plot at the top: its error bars are each point's spread over seeds, "
                "which carries every seed's accuracy swing on both sides; the readings above pair "
                "the runs by seed instead. The pairs themselves (each dot one seed's pair; right "
                "of the dotted line: more attack MSE than moving along the noise line gives for "
                "that accuracy change):",
                "",
                f"![paired by seed]({pairs_plot})",
                "",
            ]
            if have_pairs
            else []
        ),
        "## Which CEM",
        "",
        "Every `cem_noise` variant (the paper's Gaussian-mixture bound `gmm` or the official hinge "
        "`reference`; λ constant or scaled by lr₀/lr like the official code, `invlr`) against the "
        'noise frontier at its own accuracy. "The default" below is the study\'s `cem_noise` as '
        f"its runs trained: {default_label(records)}.",
        "",
        *([f"![variants]({variants_plot})", ""] if have_variants else []),
        *variants_section(records, fit),
        "",
        "## Every other defense family, with and without CEM",
        "",
        *families_section(records, families_plot if have_families else None, fit),
        "",
        "## The table",
        "",
        collect.table_markdown(records),
        "",
        "## How it was made",
        "",
        *compute_section(records, machine, table.get("scale")),
        *scale_how,
        "",
        "```bash",
        command,
        command + " --collect_only",
        *(
            line
            for c in (sweep_command(stable, sroot) for sroot, stable in scales)
            for line in (c, c + " --collect_only")
        ),
        page_command,
        "```",
        "",
        f"Commits that produced the points: {', '.join(commits)}.",
        *(
            [
                "",
                f"Every finished run is recorded in `{table['records']}` (one JSON line per run: "
                "config, commit, accuracy, certificate, attacks, wall time), committed with this "
                "page: on a fresh machine the sweep skips the recorded runs and `--collect_only` "
                "rebuilds the table from them, so the page regenerates without the workdirs.",
            ]
            if table.get("records")
            else []
        ),
        "",
        "| point | seeds | runs | commit |",
        "|---|---|---|---|",
    ]
    for r in records:
        rs = r.get("runs", [])
        lines.append(
            f"| {r['name']} | {', '.join(str(x.get('seed')) for x in rs)} | "
            f"{len(rs)} | {', '.join(sorted({x.get('commit') or '-' for x in rs}))} |"
        )
    text = "\n".join(lines) + "\n"
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return text


def _main(argv: list[str]) -> None:
    # expected failures (cem_jax.errors.CemError) end in one "error:" line: config_flags.run_main;
    # the input is checked here, so an error inside write_page keeps its traceback (a bug)
    from cem_jax import errors

    config_flags.check_no_arguments(argv)
    if not FLAGS.root:
        raise errors.UsageError("--root is required (the sweep's root folder).")
    _read_table(FLAGS.root)
    for scale_root in FLAGS.scale_root:
        _read_table(scale_root, "--scale_root")
    write_page(FLAGS.root, FLAGS.out, FLAGS.command, FLAGS.machine, FLAGS.scale_root)
    print(f"wrote {FLAGS.out}")


def main() -> None:
    """``python -m experiments.results_page``."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
