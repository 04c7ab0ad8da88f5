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
import shutil
import sys
from typing import Any

from absl import flags

from cem_jax.cli import collect, config_flags

FLAGS = flags.FLAGS
KEY = "decoder.train_time.mse"


def define_flags() -> list[str]:
    flags.DEFINE_string("root", None, "The sweep's --root (holding table.json).")
    flags.DEFINE_string("out", "docs/results.md", "The page to write; its plot goes beside it.")
    flags.DEFINE_string(
        "command", None, "The sweep command to print on the page (default: a guess)."
    )
    return ["root", "out", "command"]


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
                row["gain"] = mse / row["base_mse"] - 1.0
                row["diff"] = mse - row["base_mse"]
                row["diff_std"] = math.sqrt(std**2 + row["base_std"] ** 2)
                break
        out.append(row)
    return out


def answer(rows: list[dict[str, Any]]) -> str:
    """The one-paragraph answer, whichever way the numbers go."""
    inside = [r for r in rows if r["base_mse"] is not None]
    if not inside:
        return (
            "**Not answered yet.** No finished `cem_noise` point lies inside the accuracy range "
            "spanned by the finished `noise` points, so the two cannot be compared at equal accuracy."
        )
    parts = []
    for r in inside:
        verdict = (
            "higher"
            if r["diff"] > 2 * r["diff_std"]
            else "lower"
            if r["diff"] < -2 * r["diff_std"]
            else "not distinguishable from"
        )
        parts.append(
            f"`{r['name']}` (accuracy {r['acc']:.3f}, n={r['n']}): attack MSE {r['mse']:.4f} ± "
            f"{r['std']:.4f} against {r['base_mse']:.4f} for noise alone at that accuracy, "
            f"{r['gain']:+.0%} ({r['diff']:+.4f} ± {r['diff_std']:.4f}: {verdict} noise alone)"
        )
    better = sum(r["diff"] > 2 * r["diff_std"] for r in inside)
    head = (
        f"At equal defended accuracy, `cem_noise` gives a higher train-time decoder MSE than `noise` "
        f"at {better} of {len(inside)} comparable points (a difference counts when it exceeds twice "
        "its spread over seeds)."
    )
    return head + " " + "; ".join(parts) + "."


def write_page(root: str, out: str, command: str | None = None) -> str:
    path = os.path.join(root, collect.TABLE_JSON)
    if not os.path.exists(path):
        raise ValueError(
            f"{path} not found: run the sweep, then the same command with --collect_only first."
        )
    with open(path) as f:
        table = json.load(f)
    records = table["rows"]
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    plot_name = os.path.splitext(os.path.basename(out))[0] + "_privacy_utility.png"
    src = os.path.join(root, collect.PLOT_PNG)
    have_plot = os.path.exists(src)
    if have_plot:
        shutil.copyfile(src, os.path.join(folder, plot_name))
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
        "## The frontier",
        "",
        f"![privacy-utility]({plot_name})" if have_plot else "(no plot: no finished run)",
        "",
        "## The table",
        "",
        collect.table_markdown(records),
        "",
        "## How it was made",
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
        write_page(FLAGS.root, FLAGS.out, FLAGS.command)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {FLAGS.out}")


def main() -> None:
    """``python -m experiments.results_page``."""
    config_flags.start(__doc__, define_flags(), _main)


if __name__ == "__main__":
    main()
