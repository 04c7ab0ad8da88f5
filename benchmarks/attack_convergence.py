"""Where a converged decoder attack spends its steps, read from a study's recorded validation curves.

    python -m benchmarks.attack_convergence                                   # the quick study
    python -m benchmarks.attack_convergence --runs docs/results_full_runs.jsonl   # cifar_full
    python -m benchmarks.attack_convergence --json

Every record of a study (one line of ``docs/results_runs.jsonl``) keeps each trained attack's
validation curve (``attacks/<attack>/<setting>/curve``: the held-out MSE every ``eval_every``
steps) and where the plateau rule stopped it. From those curves, per attack and setting, over the
converged runs: the steps run, the step of the best validation MSE (the weights kept), and the
first step whose validation MSE came within 2 %, 5 % and 10 % of that best. The gap between the
best step and the last is what detecting the plateau costs (``patience`` evaluations at the last
rate); the steps to "within x %" bound what any stopping rule on the same curve could save. Nothing
is re-run: the figures describe the curves as they were recorded (a different rule would also have
decayed the rate at other steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = os.path.join(ROOT, "docs", "results_runs.jsonl")
WITHIN = (0.02, 0.05, 0.10)


def curve_figures(curve: Sequence[dict[str, Any]], within: Iterable[float] = WITHIN) -> dict:
    """``{"steps", "best_step", "best_val_mse", "within_<p>pct": step}`` of one validation curve
    (``[{"step", "val_mse"}, ...]`` in step order).

    >>> c = [{"step": 100, "val_mse": 0.2}, {"step": 200, "val_mse": 0.104},
    ...      {"step": 300, "val_mse": 0.1}, {"step": 400, "val_mse": 0.1}]
    >>> f = curve_figures(c, within=(0.05,))
    >>> f["steps"], f["best_step"], f["within_5pct"]
    (400, 300, 200)
    """
    if not curve:
        raise ValueError("curve: empty; expected the validations of a trained attack.")
    best = min(p["val_mse"] for p in curve)
    best_step = next(p["step"] for p in curve if p["val_mse"] == best)
    out: dict[str, Any] = {"steps": curve[-1]["step"], "best_step": best_step, "best_val_mse": best}
    for w in within:
        out[f"within_{round(100 * w)}pct"] = next(
            p["step"] for p in curve if p["val_mse"] <= (1.0 + w) * best
        )
    return out


def summarize(records: Iterable[dict[str, Any]], within: Iterable[float] = WITHIN) -> dict:
    """``{"<attack>/<setting>": {"runs", "not_converged", "<figure>": {"median", "min", "max"},
    "oracle_saving": median fraction of steps after the best step}}`` over the converged attacks of
    ``records`` (study records, as ``experiments.sweep`` writes them)."""
    within = tuple(within)
    groups: dict[str, list[dict]] = {}
    skipped: dict[str, int] = {}
    for rec in records:
        for attack, settings in (rec.get("attacks") or {}).items():
            for setting, res in (settings or {}).items():
                if not isinstance(res, dict) or not res.get("curve"):
                    continue  # an attack without a fit loop (white-box) or no curve recorded
                name = f"{attack}/{setting}"
                if not res.get("converged"):
                    skipped[name] = skipped.get(name, 0) + 1
                    continue
                groups.setdefault(name, []).append(curve_figures(res["curve"], within))
    out: dict[str, Any] = {}
    for name in sorted(set(groups) | set(skipped)):
        figs = groups.get(name, [])
        entry: dict[str, Any] = {"runs": len(figs), "not_converged": skipped.get(name, 0)}
        for key in ("steps", "best_step", *(f"within_{round(100 * w)}pct" for w in within)):
            values = [f[key] for f in figs]
            if values:
                entry[key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        if figs:
            entry["oracle_saving"] = statistics.median(
                (f["steps"] - f["best_step"]) / f["steps"] for f in figs
            )
        out[name] = entry
    return out


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a study file (JSON lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="a study's records (JSON lines)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.runs):
        ap.error(f"--runs {args.runs}: no such file; expected a study's records (JSON lines).")
    summary = summarize(read_records(args.runs))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.runs}: converged attacks' validation curves (steps: median [min, max])")
    for name, e in summary.items():
        print(f"\n{name}: {e['runs']} converged runs, {e['not_converged']} not converged")
        for key, label in (
            ("steps", "steps run"),
            ("best_step", "best validation at"),
            *((f"within_{round(100 * w)}pct", f"within {100 * w:.0f} % of it at") for w in WITHIN),
        ):
            if key in e:
                v = e[key]
                print(f"  {label:26s} {v['median']:7.0f}  [{v['min']}, {v['max']}]")
        if "oracle_saving" in e:
            print(
                f"  after the best step: {100 * e['oracle_saving']:.0f} % of the steps (median), "
                "the most a perfect stop could save"
            )


if __name__ == "__main__":
    main()
