r"""Writes the results page (``docs/results.md`` and its plot) from a finished sweep or study.

    python -m experiments.results_page --root=runs/frontier --out=docs/results.md

It reads ``<root>/table.json`` (written by ``experiments.sweep --collect_only``), copies
``privacy_utility.png`` beside the page and writes: the question, the answer computed from the table
(at equal defended accuracy, the train-time decoder MSE of ``cem_noise`` against the ``noise``
frontier, interpolated linearly in accuracy, with its spread over seeds), the table, the commands,
the scale, the compute and which commit produced each point.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from absl import flags

from cem_jax import storage
from cem_jax.cli import collect, config_flags

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
    return ["root", "out", "command", "machine"]


def frontier_comparison(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> list[dict[str, Any]]:
    """For each ``other`` point: the ``base`` frontier's attack MSE at the same defended accuracy.

    The base frontier is the piecewise-linear curve through its points' mean (accuracy, MSE), sorted
    by accuracy; points outside its accuracy range get ``None``. The spread combines the point's
    seed std with the interpolated std of the two base points around it.

    >>> rec = lambda d, acc, mse, s=0.0: {"defense": d, "name": f"{d}{acc}", "n": 3, "metrics": {
    ...     "defended_acc": {"mean": acc, "std": s}, KEY: {"mean": mse, "std": s}}}
    >>> out = frontier_comparison([rec("noise", 0.3, 0.02), rec("noise", 0.2, 0.04),
    ...                            rec("cem_noise", 0.25, 0.045)])
    >>> round(out[0]["base_mse"], 4), round(out[0]["gain"], 3)
    (0.03, 0.5)
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
                row["diff_std"] = math.sqrt(std**2 + row["base_std"] ** 2)
                break
        out.append(row)
    return out


def _verdict(r: dict[str, Any]) -> str:
    """``higher`` / ``lower`` / ``not distinguishable from`` noise alone, or ``no spread`` (one seed)."""
    if r["n"] < 2 or r.get("base_n", 0) < 2:
        return "one seed on a side, so no spread: not evidence either way yet"
    if r["diff"] > 2 * r["diff_std"]:
        return "higher than noise alone"
    if r["diff"] < -2 * r["diff_std"]:
        return "lower than noise alone"
    return "not distinguishable from noise alone"


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
    better = sum(r["diff"] > 2 * r["diff_std"] for r in seeded)
    worse = sum(r["diff"] < -2 * r["diff_std"] for r in seeded)
    head = (
        f"At equal defended accuracy, `{other}` gives a higher train-time decoder MSE than `noise` "
        f"at {better} and a lower one at {worse} of the {len(seeded)} comparable points with at "
        "least two seeds on both sides (a difference counts when it exceeds twice its spread over "
        f"seeds); {len(inside) - len(seeded)} more comparable point(s) have one seed."
    )
    mean_gain = sum(r["gain"] for r in inside) / len(inside)
    head += f" Mean relative change over all {len(inside)}: {mean_gain:+.0%}."
    return head + " " + "; ".join(parts) + "."


def line_comparison(
    records: list[dict[str, Any]], *, base: str = "noise", other: str = "cem_noise"
) -> dict[str, Any] | None:
    """A second, smoother reading: a straight line ``MSE = a + b·accuracy`` fitted (least squares)
    through every ``base`` run (each seed its own point), and each ``other`` point against it.

    Final-epoch accuracy at a small scale moves by points from seed to seed, so neighbouring noise
    points can cross; the line uses all of them at once. ``resid_std`` is a single noise run's
    scatter about the line. ``None`` with fewer than 3 base runs or no spread in accuracy.

    >>> rec = lambda d, accs, mses: {"defense": d, "name": d, "n": len(accs), "metrics": {
    ...     "defended_acc": {"mean": sum(accs) / len(accs), "values": accs},
    ...     KEY: {"mean": sum(mses) / len(mses), "values": mses}}}
    >>> out = line_comparison([rec("noise", [0.3, 0.2, 0.1], [0.01, 0.02, 0.03]),
    ...                        rec("cem_noise", [0.25], [0.03])])
    >>> round(out["slope"], 3), round(out["rows"][0]["line_mse"], 4), round(out["rows"][0]["gain"], 2)
    (-0.1, 0.015, 1.0)
    """
    xs: list[float] = []
    ys: list[float] = []
    for r in records:
        m = r["metrics"]
        if r["defense"] != base or "defended_acc" not in m or KEY not in m:
            continue
        accs, mses = m["defended_acc"].get("values"), m[KEY].get("values")
        if accs and mses and len(accs) == len(mses):
            xs += [float(v) for v in accs]
            ys += [float(v) for v in mses]
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    resid = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    resid_std = math.sqrt(sum(e * e for e in resid) / (n - 2)) if n > 2 else 0.0
    rows = []
    for r in records:
        m = r["metrics"]
        if r["defense"] != other or "defended_acc" not in m or KEY not in m:
            continue
        acc, mse = m["defended_acc"]["mean"], m[KEY]["mean"]
        line = intercept + slope * acc
        rows.append(
            {
                "name": r["name"],
                "n": r["n"],
                "acc": acc,
                "mse": mse,
                "line_mse": line,
                "gain": mse / line - 1.0 if line > 0 else float("nan"),
                "inside": min(xs) <= acc <= max(xs),
            }
        )
    return {
        "slope": slope,
        "intercept": intercept,
        "resid_std": resid_std,
        "n": n,
        "acc_range": (min(xs), max(xs)),
        "rows": rows,
    }


def line_paragraph(fit: dict[str, Any] | None, other: str = "cem_noise") -> str:
    if fit is None or not fit["rows"]:
        return "(The straight-line reading needs at least 3 finished noise runs and one cem_noise run.)"
    lo, hi = fit["acc_range"]
    parts = []
    for r in fit["rows"]:
        where = "" if r["inside"] else ", outside the noise runs' accuracy range: extrapolated"
        z = (r["mse"] - r["line_mse"]) / fit["resid_std"] if fit["resid_std"] > 0 else float("nan")
        parts.append(
            f"`{r['name']}` (n={r['n']}, accuracy {r['acc']:.3f}{where}): {r['mse']:.4f} against "
            f"{r['line_mse']:.4f}, {r['gain']:+.0%} ({z:+.1f} noise-run residual std)"
        )
    return (
        f"A second reading, less sensitive to one seed's accuracy: a straight line through all "
        f"{fit['n']} noise runs (attack MSE = {fit['intercept']:.4f} {fit['slope']:+.4f} × "
        f"accuracy, accuracy {lo:.3f}–{hi:.3f}, a single run's scatter about it "
        f"{fit['resid_std']:.4f}). Against it, `{other}`: " + "; ".join(parts) + "."
    )


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
        gain = f", {10 * math.log10(base['mean'] / m[KEY]['mean']):+.1f} dB over the mean image"
    return (
        f"Undefended check (`none`, n={none[0]['n']}): the converged decoder attack reaches MSE "
        f"{m[KEY]['mean']:.4f} (PSNR {psnr.get('mean', float('nan')):.2f} dB) against the mean "
        f"image's {base.get('mean', float('nan')):.4f}{gain}."
    )


def variants_section(records: list[dict[str, Any]]) -> list[str]:
    """Which CEM: every ``cem_noise`` variant (loss mode, λ schedule, λ) against the noise frontier."""
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
    return lines if len(lines) > 2 else ["(no finished cem_noise run yet)"]


def compute_section(records: list[dict[str, Any]], machine: str | None) -> list[str]:
    """The scale (the preset's sizes and the attack protocol) and the compute (wall time, devices)."""
    results = []
    workdirs = dict.fromkeys(run.get("workdir") or "" for r in records for run in r.get("runs", []))
    for workdir in workdirs:
        if workdir:
            path = storage.join(workdir, "results.json")
            try:
                results.append(json.loads(storage.read_text(path)))
            except (OSError, ValueError):
                continue
    if not results:
        return ["(no results.json readable)"]
    cfg = results[0].get("config") or {}
    ds = results[0].get("dataset") or {}
    walls = sorted(float(x.get("wall_time_s") or 0.0) for x in results)
    devices = sorted({str(x.get("devices")) for x in results})
    attack = (
        f"attacks {', '.join(cfg.get('attacks') or [])} ({', '.join(cfg.get('attack_settings') or [])}), "
        f"at most {cfg.get('attack_steps')} steps of batch {cfg.get('attack_batch_size')}, validated "
        f"every {cfg.get('attack_eval_every')} steps, converged after {cfg.get('attack_patience')} "
        f"validations without a {cfg.get('attack_min_improvement')} relative improvement "
        f"({cfg.get('attack_lr_decays')} learning-rate decay(s) first)"
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
        f"- Compute: {len(results)} runs, {sum(walls) / 3600:.1f} h of wall time in all, "
        f"{walls[len(walls) // 2] / 60:.1f} min per run (median; train + attack), on "
        f"{', '.join(devices)}" + (f" ({machine})" if machine else "") + ".",
    ]


def write_page(root: str, out: str, command: str | None = None, machine: str | None = None) -> str:
    storage.check(root, "--root")
    path = storage.join(root, collect.TABLE_JSON)
    if not storage.exists(path):
        raise ValueError(
            f"{path} not found: run the sweep, then the same command with --collect_only first."
        )
    table = json.loads(storage.read_text(path))
    records = table["rows"]
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    plot_name = os.path.splitext(os.path.basename(out))[0] + "_privacy_utility.png"
    src = storage.join(root, collect.PLOT_PNG)
    have_plot = storage.exists(src)
    if have_plot:
        with open(os.path.join(folder, plot_name), "wb") as f:
            f.write(storage.read_bytes(src))
    rows = frontier_comparison(records)
    runs = [run for r in records for run in r.get("runs", [])]
    commits = sorted({run.get("commit") or "unrecorded" for run in runs})
    study = table.get("study")
    command = command or (
        f"python -m experiments.sweep --study={study} --root={root}"
        if study
        else f"python -m experiments.sweep ... --root={root}"
    )
    lines = [
        "# Results: CEM's privacy–utility frontier against noise alone",
        "",
        f"Dataset {table.get('dataset')}, preset `{table.get('preset')}`; "
        f"{table.get('finished')} of {table.get('runs')} runs of the grid finished.",
        "",
        "## The answer",
        "",
        answer(rows),
        "",
        line_paragraph(line_comparison(records)),
        "",
        undefended_line(records),
        "",
        "## The frontier",
        "",
        f"![privacy-utility]({plot_name})" if have_plot else "(no plot: no finished run)",
        "",
        "## Which CEM",
        "",
        "Every `cem_noise` variant (the paper's Gaussian-mixture bound `gmm` or the official hinge "
        "`reference`; λ constant or scaled by lr₀/lr like the official code, `invlr`) against the "
        "noise frontier at its own accuracy:",
        "",
        *variants_section(records),
        "",
        "## The table",
        "",
        collect.table_markdown(records),
        "",
        "## How it was made",
        "",
        *compute_section(records, machine),
        "",
        "```bash",
        command,
        command + " --collect_only",
        f"python -m experiments.results_page --root={root} --out={out}",
        "```",
        "",
        f"Commits that produced the points: {', '.join(commits)}.",
        "",
        "| point | seeds | workdirs | commit |",
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
    if not FLAGS.root:
        sys.exit("error: --root is required (the sweep's root folder).")
    try:
        write_page(FLAGS.root, FLAGS.out, FLAGS.command, FLAGS.machine)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {FLAGS.out}")


def main() -> None:
    """``python -m experiments.results_page``."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
