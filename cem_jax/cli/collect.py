"""A sweep's grid, its workdirs, and the collected table and privacy–utility plot (no flags here).

A grid point is ``{"defense", "sigma", "lambd", "seed"}`` (``None``: the preset's value); the runs of one
point that differ only in their seed are aggregated into one row: the mean, the sample standard deviation
(``ddof=1``; none for a single seed) and the number of seeds of every metric.

>>> pts = grid(["none", "cem_noise"], sigmas=[0.1, 0.2], lambdas=[1.0], seeds=[1, 2])
>>> [run_name(p) for p in pts][:3]
['none_seed1', 'none_seed2', 'cem_noise_s0.1_l1_seed1']
>>> len(pts)
6
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cem_jax import storage
from cem_jax.errors import InputError

RESULTS_FILE = "results.json"  # cem_jax.runner.RESULTS_FILE (not imported: collecting needs no jax)
TABLE_MD, TABLE_JSON, PLOT_PNG = "table.md", "table.json", "privacy_utility.png"

# Metrics of one run, by name, read from its results.json: (path into the dict).
# leakage_bits: the certificate (results.json since the attacks/certificate rework); leakage_bits_full /
# _diagonal: the estimates older results.json files carried instead.
_FINAL = ("clean_acc", "defended_acc", "leakage_bits", "leakage_bits_full", "leakage_bits_diagonal")
_ATTACK_METRICS = ("mse", "psnr", "ssim")


# --------------------------------------------------------------------------------------------- grid
def grid(
    defenses: Sequence[str],
    sigmas: Sequence[float] = (),
    lambdas: Sequence[float] = (),
    seeds: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Every run of the sweep: defenses × σ × λ × seeds.

    σ applies to the defenses with noise (``noise`` and every ``cem_*``), λ to those with CEM; the
    others (``none``, ``dropout``, ...) get one point per seed. An unknown defense name passes through
    (the config's validation names it).
    """
    from cem_jax.defenses import DEFENSES

    points = []
    for defense in _unique(defenses):
        preset = DEFENSES.get(defense, {})
        sig = (list(_unique(sigmas)) or [None]) if preset.get("sigma") else [None]
        lam = (list(_unique(lambdas)) or [None]) if preset.get("cem") else [None]
        for sigma, lambd in itertools.product(sig, lam):
            for seed in list(_unique(seeds)) or [None]:
                points.append({"defense": defense, "sigma": sigma, "lambd": lambd, "seed": seed})
    return _unique_dicts(points)


def point_name(point: dict[str, Any]) -> str:
    """The grid point's name without its seed: ``cem_noise_s0.1_l1`` (``_<variant>`` in a study)."""
    name = point["defense"]
    if point.get("sigma") is not None:
        name += f"_s{point['sigma']:g}"
    if point.get("lambd") is not None:
        name += f"_l{point['lambd']:g}"
    if point.get("variant"):
        name += f"_{point['variant']}"
    return name


def family(point: dict[str, Any]) -> str:
    """The curve a point belongs to: its defense, with the study variant (``cem_noise [reference]``)."""
    return point["defense"] + (f" [{point['variant']}]" if point.get("variant") else "")


def run_name(point: dict[str, Any]) -> str:
    """The run's folder name: the point's, plus ``_seed<k>`` when the sweep has seeds."""
    name = point_name(point)
    return name if point.get("seed") is None else f"{name}_seed{point['seed']}"


def workdir_of(root: str, dataset: str, preset: str, point: dict[str, Any]) -> str:
    return storage.join(root, f"{dataset}_{preset}", run_name(point))


def overrides_of(point: dict[str, Any]) -> dict[str, Any]:
    """The point's RunConfig overrides (its non-``None`` axes, then a study group's ``extra``)."""
    axes = {k: v for k, v in point.items() if k in AXES and v is not None}
    return {**axes, **(point.get("extra") or {})}


AXES = ("defense", "sigma", "lambd", "seed")


# ---------------------------------------------------------------------------------------- studies
def study_common(spec: dict[str, Any], point: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a study gives every run (``common``) and, for a ``point`` of a CEM defense (a
    ``cem_*`` preset), every CEM run (``cem_common``, e.g. ``{"lambd": 1}``: the study's CEM runs
    keep their λ when the presets' default changes). A point's own axes and its group's overrides
    win over both (the caller merges them last). JSON lists become tuples.

    >>> spec = {"common": {"epochs": 2}, "cem_common": {"lambd": 1.0}}
    >>> study_common(spec, {"defense": "cem_noise"}), study_common(spec, {"defense": "noise"})
    ({'epochs': 2, 'lambd': 1.0}, {'epochs': 2})
    """
    from cem_jax import defenses

    out = dict(spec.get("common") or {})
    name = (point or {}).get("defense")
    if name is not None and defenses.DEFENSES.get(name, {}).get("cem"):
        out.update(spec.get("cem_common") or {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def load_study(path: str) -> dict[str, Any]:
    """A study spec (JSON): ``{"description", "preset", "dataset", "records", "common": {field: value},
    "cem_common": {field: value}, "groups": [{"defenses", "sigmas", "lambdas", "seeds", "variant",
    "overrides"}]}`` (``cem_common``: settings of the CEM runs only, :func:`study_common`).

    ``records``: the study's records file (:func:`add_records`), relative to where the sweep runs.

    Returns it with ``"points"``: every run of every group (a group's ``overrides`` go into each
    point's ``extra`` and its ``variant`` names the points apart). Raises
    :class:`~cem_jax.errors.InputError` (a ``ValueError``) naming what is wrong.
    """
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise InputError(
            f"--study={path}: cannot read it ({e.strerror}); accepted a study spec (JSON), e.g. "
            "experiments/studies/frontier_cifar10.json."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--study={path}: not valid JSON ({e}).") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), list) or not spec["groups"]:
        raise InputError(f"--study={path}: accepted an object with a non-empty list 'groups'.")
    allowed = {"defenses", "sigmas", "lambdas", "seeds", "variant", "overrides"}
    points: list[dict[str, Any]] = []
    for i, g in enumerate(spec["groups"]):
        unknown = sorted(set(g) - allowed) if isinstance(g, dict) else ["<not an object>"]
        if unknown or not g.get("defenses"):
            raise InputError(
                f"--study={path}: group {i}: unknown keys {unknown} or no 'defenses'; accepted "
                f"keys: {sorted(allowed)}."
            )
        extra = dict(g.get("overrides") or {})
        variant = g.get("variant")
        if extra and not variant:
            raise InputError(f"--study={path}: group {i} has overrides: give it a 'variant' name.")
        for p in grid(g["defenses"], g.get("sigmas", ()), g.get("lambdas", ()), g.get("seeds", ())):
            if variant:
                p = {**p, "variant": variant, "extra": extra}
            points.append(p)
    spec["points"] = points
    return spec


# ------------------------------------------------------------------------------------------ records
# A study's finished runs, one JSON line each, small enough to commit beside its results page. Workdirs
# hold checkpoints and live on one machine; the records travel with the repository, so a sweep on a
# fresh machine skips the runs they hold and the table is collected from them.
_RECORD_KEYS = (
    "status",
    "format_version",
    "commit",
    "config",
    "fingerprint",
    "attack_config",
    "dataset",
    "devices",
    "final",
    "attacks",
    "train_wall_time_s",
    "wall_time_s",
)
_RECORD_DROP = {"dataset": ("class_names",)}  # repeated in every run; the rest is kept


def run_record(run: str, results: dict[str, Any]) -> dict[str, Any]:
    """What a study keeps of one run's ``results.json``: ``{"run": name, ...}``.

    Everything :func:`run_metrics`, the table and the results page read (config, commit, dataset
    identity, final accuracy and certificate, every attack entry, wall time); not the per-epoch
    ``history`` (that stays in the workdir's ``metrics.jsonl``) nor the workdir, a path on one
    machine.

    >>> run_record("noise_s0.1_seed1", {"final": {"defended_acc": 0.3}, "history": [{}]})
    {'run': 'noise_s0.1_seed1', 'final': {'defended_acc': 0.3}}
    """
    out: dict[str, Any] = {"run": run}
    for key in _RECORD_KEYS:
        if key in results:
            value = results[key]
            if key in _RECORD_DROP and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in _RECORD_DROP[key]}
            out[key] = value
    return out


def read_records(path: str) -> dict[str, dict[str, Any]]:
    """``{run name: record}`` of a records file (JSON lines); ``{}`` when it does not exist.

    Raises :class:`~cem_jax.errors.InputError` (a ``ValueError``) naming the file and line of
    anything that is not a record.
    """
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return {}
    records: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not a JSON line ({e}).") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("run"), str):
            raise InputError(f'{path}:{i}: accepted one object per line with a "run" name.')
        records[rec["run"]] = rec
    return records


def add_records(path: str, new: dict[str, dict[str, Any]]) -> int:
    """Adds (or replaces) ``{run name: results}`` in the records file; returns how many changed.

    The file is re-read first and rewritten atomically, sorted by run name, one line per run (a diff
    of two versions shows the runs that were added). Nothing is written when nothing changed.
    """
    records = read_records(path)
    changed = 0
    for run, results in new.items():
        rec = run_record(run, results)
        if records.get(run) != json.loads(json.dumps(rec)):
            records[run] = rec
            changed += 1
    if changed:
        parent = storage.parent(path)
        if parent:
            storage.makedirs(parent)
        lines = [json.dumps(records[k], sort_keys=True) for k in sorted(records)]
        storage.write_text(path, "\n".join(lines) + "\n")
    return changed


def record_mismatch(record: dict[str, Any], fingerprint: dict, attack_config: dict) -> str:
    """How a record's configuration differs from the wanted one (``""``: it is the same run). The
    training side goes through :func:`cem_jax.config.fingerprint_diff`, so a record made under
    another defense preset (say another λ of the cem_* presets) does not pass for the same run."""
    from cem_jax.config import dict_diff, fingerprint_diff

    diffs = []
    for what, changed in (
        ("training", fingerprint_diff(record.get("fingerprint") or {}, fingerprint)),
        ("attack", dict_diff(record.get("attack_config") or {}, attack_config)),
    ):
        diffs += [
            f"{what} {k}: {a!r} recorded vs {b!r} now" for k, (a, b) in sorted(changed.items())
        ]
    return "; ".join(diffs)


# ------------------------------------------------------------------------------------------ collect
def load_runs(
    workdirs: Iterable[tuple[dict[str, Any], str]],
    records: dict[str, dict[str, Any]] | None = None,
) -> list[tuple[dict, dict]]:
    """``(point, results)`` of every finished run: its workdir's ``results.json``, else its record.

    ``records`` (:func:`read_records`) stand in for workdirs that are gone (another machine's).
    A damaged ``results.json`` is an :class:`~cem_jax.errors.InputError` naming it.
    """
    runs = []
    for point, workdir in workdirs:
        path = storage.join(workdir, RESULTS_FILE)
        try:
            res = json.loads(storage.read_text(path))
        except FileNotFoundError:
            res = (records or {}).get(run_name(point))
            if res is None:
                continue  # not finished
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(
                f"{path} is unreadable ({e}). Restore it, or move it away: the sweep then "
                "resumes that run from its checkpoints (or takes it from its record)."
            ) from None
        if not isinstance(res, dict):
            raise InputError(f"{path} does not hold a results object; move it away or restore it.")
        res.setdefault("workdir", workdir)
        runs.append((point, res))
    return runs


def run_metrics(results: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """``{metric: (value, flagged)}`` of one run.

    Names: ``clean_acc``, ``defended_acc``, ``leakage_bits`` (the certificate; older files:
    ``leakage_bits_full``, ``leakage_bits_diagonal``) and
    ``<attack>.<setting>.<mse|psnr|ssim|baseline_mse>``. An attack entry is *flagged* when it says it
    is not ``informative`` (no better than the mean-image baseline) or not ``converged``; missing keys
    flag nothing.
    """
    out: dict[str, tuple[float, bool]] = {}
    final = results.get("final") or {}
    for name in _FINAL:
        v = _number(final.get(name))
        if v is not None:
            out[name] = (v, False)
    for attack, settings in (results.get("attacks") or {}).items():
        if not isinstance(settings, dict):
            continue
        for setting, entry in settings.items():
            if not isinstance(entry, dict):
                continue
            flagged = entry.get("informative") is False or entry.get("converged") is False
            for m in _ATTACK_METRICS:
                v = _number(entry.get(m))
                if v is not None:
                    out[f"{attack}.{setting}.{m}"] = (v, flagged)
            base = entry.get("baseline")
            base = base.get("mse") if isinstance(base, dict) else base
            if _number(base) is not None:
                out[f"{attack}.{setting}.baseline_mse"] = (_number(base), False)
    return out


def summarize(runs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per grid point (seeds aggregated), in the order of ``runs``.

    ``{"name", "defense", "sigma", "lambd", "n", "runs": [{"seed", "workdir", "commit",
    "wall_time_s", "devices"}],
    "metrics": {name: {"mean", "std", "n", "values", "flagged", "seeds"}}}`` (``seeds[i]`` the seed
    of ``values[i]``, so two points' runs pair by seed); σ and λ are the values the runs used (the
    defense preset's when the sweep did not set them; λ ``None`` without CEM). A CEM point also has
    ``"cem_loss": {"mode", "schedule"}``, the loss and λ schedule its runs trained with.
    """
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for point, res in runs:
        groups.setdefault(point_name(point), []).append((point, res))
    records = []
    for name, members in groups.items():
        _check_one_defense(name, members)
        point, first = members[0]
        sigma, lambd = _resolved_sigma_lambd(point, first)
        per_run = [run_metrics(res) for _, res in members]
        seeds = [(res.get("config") or {}).get("seed", p.get("seed")) for p, res in members]
        metrics = {}
        for key in dict.fromkeys(k for m in per_run for k in m):
            vals = [m[key] for m in per_run if key in m]
            metrics[key] = stats([v for v, _ in vals]) | {
                "flagged": sum(f for _, f in vals),
                "seeds": [seed for seed, m in zip(seeds, per_run, strict=True) if key in m],
            }
        records.append(
            {
                "name": name,
                "defense": family(point),
                "sigma": sigma,
                "lambd": lambd,
                **({"cem_loss": _cem_loss(first)} if lambd is not None else {}),
                "n": len(members),
                "runs": [
                    {
                        "seed": seed,
                        "workdir": res.get("workdir"),
                        **{k: res[k] for k in ("commit", "wall_time_s", "devices") if k in res},
                    }
                    for seed, (_, res) in zip(seeds, members, strict=True)
                ],
                "metrics": metrics,
            }
        )
    return records


def scale(results: dict[str, Any]) -> dict[str, Any]:
    """The sizes and attack protocol of a run (``{"config", "dataset"}``), for the page's scale line."""
    ds = results.get("dataset") or {}
    return {
        "config": results.get("config") or {},
        "dataset": {k: ds.get(k) for k in ("name", "num_train", "num_test")},
    }


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (``ddof=1``; ``None`` for one value) and count.

    >>> stats([1.0, 2.0, 3.0])
    {'mean': 2.0, 'std': 1.0, 'n': 3, 'values': [1.0, 2.0, 3.0]}
    """
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
        "n": len(a),
        "values": [float(v) for v in a],
    }


# (header, metric, format) of the table's columns after defense | σ | λ | n
COLUMNS = (
    ("acc clean", "clean_acc", ".4f"),
    ("acc defended", "defended_acc", ".4f"),
    ("leakage bits (certificate)", "leakage_bits", ".1f"),
    ("leakage bits (full-cov. estimate)", "leakage_bits_full", ".1f"),
    ("decoder train-time MSE", "decoder.train_time.mse", ".4f"),
    ("PSNR", "decoder.train_time.psnr", ".2f"),
    ("SSIM", "decoder.train_time.ssim", ".3f"),
    ("mean-image MSE", "decoder.train_time.baseline_mse", ".4f"),
    ("decoder inference-time MSE", "decoder.inference_time.mse", ".4f"),
    ("PSNR", "decoder.inference_time.psnr", ".2f"),
    ("white-box train-time MSE", "whitebox.train_time.mse", ".4f"),
    ("PSNR", "whitebox.train_time.psnr", ".2f"),
    ("GAN train-time MSE", "gan.train_time.mse", ".4f"),
    ("PSNR", "gan.train_time.psnr", ".2f"),
)
_ALWAYS = ("clean_acc", "defended_acc")  # columns shown even when no run has them


def table_markdown(records: Sequence[dict[str, Any]]) -> str:
    """The Markdown table: ``mean ± std`` per metric (``std`` only with ≥ 2 seeds), ``n`` seeds.

    A metric column no run has (e.g. the GAN's when no run attacked with it) is left out; the full set
    of metrics is in ``table.json``.
    """
    columns = [c for c in COLUMNS if c[1] in _ALWAYS or any(c[1] in r["metrics"] for r in records)]
    header = ["defense", "σ", "λ", "n"] + [c[0] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flagged_any = False
    for r in records:
        cells = [r["defense"], _g(r["sigma"]), _g(r["lambd"]), str(r["n"])]
        for _, key, spec in columns:
            s = r["metrics"].get(key)
            cells.append(format_stat(s, spec, n=r["n"]))
            flagged_any |= bool(s and s["flagged"])
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    text += "\n\nmean ± sample standard deviation over the n seeds of each grid point (one value: one seed)."
    if flagged_any:
        text += (
            "\n† at least one seed's attack did not converge or did not beat the mean-image baseline "
            "(`converged` / `informative` false in its results.json): that number measures little."
        )
    return text


def format_stat(s: dict[str, Any] | None, spec: str, *, n: int | None = None) -> str:
    """``"0.0312 ± 0.0021"``, ``"0.0312"`` (one value), ``"-"`` (none); ``†`` when flagged.

    >>> format_stat({"mean": 0.5, "std": 0.25, "n": 2, "flagged": 1}, ".2f")
    '0.50 ± 0.25†'
    """
    if not s:
        return "-"
    text = f"{s['mean']:{spec}}"
    if s.get("std") is not None:
        text += f" ± {s['std']:{spec}}"
    if s.get("flagged"):
        text += "†"
    if n is not None and s["n"] != n:
        text += f" (n={s['n']})"
    return text


def write_table(root: str, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Writes ``table.md`` and ``table.json`` under ``root``; returns the Markdown."""
    storage.makedirs(root)
    text = table_markdown(records)
    storage.write_text(storage.join(root, TABLE_MD), text + "\n")
    storage.write_text(
        storage.join(root, TABLE_JSON),
        json.dumps({**meta, "rows": list(records)}, indent=2) + "\n",
    )
    return text


# ---------------------------------------------------------------------------------------------- plot
PANELS = (
    ("decoder.train_time.mse", "train-time decoder attack MSE (higher: more private)"),
    ("leakage_bits", "leakage certificate, bits / image (lower: more private)"),
)
# older results.json files have no certificate: their panel shows this estimate instead
_LEAKAGE_FALLBACK = ("leakage_bits_full", "leakage bound (full-covariance estimate), bits / image")


def plot_privacy_utility(
    records: Sequence[dict[str, Any]],
    path: str,
    *,
    title: str | None = None,
    line: tuple[float, float, float, float] | None = None,
) -> bool:
    """Draws defended accuracy against the attack MSE and against the leakage bound: one curve per
    defense family (its points in σ, then λ, order), error bars where seeds repeat, hollow markers where
    an attack is flagged (not converged / not better than the baseline), the mean-image baseline's MSE
    as a dashed line. ``line = (intercept, slope, acc_lo, acc_hi)``, if given, is a straight line
    ``MSE = intercept + slope·accuracy`` (the results page's fit through every noise run), drawn
    dotted on the MSE panel over that accuracy range. Writes a PNG at ``path``.

    Returns ``False`` (and writes nothing) when no record has the defended accuracy. Needs matplotlib
    (the ``plots`` extra); imported here, with the Agg canvas, so the rest of the package does not.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    usable = [r for r in records if "defended_acc" in r["metrics"]]
    if not usable:
        return False
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    families = list(dict.fromkeys(r["defense"] for r in usable))
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    any_flagged = False
    panels = list(PANELS)
    if not any("leakage_bits" in r["metrics"] for r in usable):
        panels[1] = _LEAKAGE_FALLBACK
    for ax, (key, xlabel) in zip(axes, panels):
        drawn = False
        for fam in families:
            # one curve per family, along its σ (then λ) axis
            pts = sorted(
                (r for r in usable if r["defense"] == fam and key in r["metrics"]),
                key=lambda r: (r["sigma"] or 0.0, r["lambd"] or 0.0),
            )
            if not pts:
                continue
            xs = [r["metrics"][key] for r in pts]
            ys = [r["metrics"]["defended_acc"] for r in pts]
            c = colors[fam]
            ax.plot([x["mean"] for x in xs], [y["mean"] for y in ys], "-", color=c, alpha=0.7)
            for r, x, y in zip(pts, xs, ys):
                flagged = bool(x.get("flagged"))
                any_flagged |= flagged
                ax.errorbar(
                    x["mean"],
                    y["mean"],
                    xerr=x["std"] or 0.0,
                    yerr=y["std"] or 0.0,
                    fmt="o",
                    color=c,
                    markerfacecolor="white" if flagged else c,
                    capsize=3,
                )
                ax.annotate(
                    _point_label(r),
                    (x["mean"], y["mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=c,
                )
            drawn = True
        if key == "decoder.train_time.mse" and line is not None:
            a, b, lo, hi = line
            ax.plot([a + b * lo, a + b * hi], [lo, hi], ":", color="0.3", lw=1.5)
            ax.annotate(
                "noise: line through every run",
                (a + b * hi, hi),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color="0.3",
            )
        if key == "decoder.train_time.mse":
            base = [
                r["metrics"]["decoder.train_time.baseline_mse"]["mean"]
                for r in usable
                if "decoder.train_time.baseline_mse" in r["metrics"]
            ]
            if base:
                ax.axvline(float(np.median(base)), color="0.5", ls="--", lw=1)
                ax.annotate(
                    "mean-image baseline",
                    (float(np.median(base)), 0.02),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=7,
                    color="0.4",
                    ha="right",
                )
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no runs with this metric", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("defended test accuracy")
    handles = [Line2D([], [], color=colors[f], marker="o", label=f) for f in families]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="defense")
    note = "mean ± std over seeds"
    if any_flagged:
        note += "; hollow: attack not converged or not better than the mean image"
    fig.suptitle(f"{title + ' — ' if title else ''}{note}", fontsize=10)
    storage.makedirs(storage.parent(path))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    storage.write_bytes(path, buf.getvalue())  # atomic, local or gs://
    return True


# ------------------------------------------------------------------------------------------- helpers
def _point_label(r: dict[str, Any]) -> str:
    parts = []
    if r["sigma"] is not None and r["defense"] != "none":
        parts.append(f"σ={r['sigma']:g}")
    if r["lambd"] is not None:
        parts.append(f"λ={r['lambd']:g}")
    return " ".join(parts)


def _resolved_defense(res: dict[str, Any]) -> dict[str, Any] | None:
    """The defense a run trained with, as its results recorded it (``None`` for runs recorded
    before the fingerprint held it)."""
    from cem_jax.config import RESOLVED_DEFENSE

    return (res.get("fingerprint") or {}).get(RESOLVED_DEFENSE)


def _check_one_defense(name: str, members: Sequence[tuple[dict, dict]]) -> None:
    """A grid point pools its seeds; refuses (:class:`~cem_jax.errors.InputError`) runs trained with different defenses,
    e.g. seeds run before and after a change of the defense presets."""
    seen = {}
    for point, res in members:
        d = _resolved_defense(res)
        if d is not None:
            seen.setdefault(json.dumps(d, sort_keys=True), point.get("seed"))
    if len(seen) > 1:
        kinds = "; ".join(f"seed {seed}: {d}" for d, seed in seen.items())
        raise InputError(
            f"grid point {name} holds runs trained with different defenses ({kinds}), so its "
            "seeds cannot be pooled: the defense presets changed between them. Pin the study's "
            "values (e.g. its lambdas) to the recorded runs', or rerun the point."
        )


def _cem_loss(res: dict[str, Any]) -> dict[str, str]:
    """The CEM loss a run trained with: ``{"mode", "schedule"}`` (``cem_mode`` and
    ``lambda_schedule`` of its config; a run from before the schedule existed had a constant λ)."""
    cfg = res.get("config") or {}
    return {
        "mode": cfg.get("cem_mode", "gmm"),
        "schedule": cfg.get("lambda_schedule", "constant"),
    }


def _resolved_sigma_lambd(point: dict[str, Any], res: dict[str, Any]) -> tuple[Any, Any]:
    """σ and λ the run used: as its results recorded them, else the defense preset's if unset;
    λ ``None`` for a defense without CEM."""
    d = _resolved_defense(res)
    if d is not None:
        return d.get("sigma"), (d.get("lambd") if d.get("cem") else None)
    cfg = res.get("config") or {}
    try:
        from cem_jax import defenses

        spec = defenses.make_defense(
            cfg.get("defense", point["defense"]),
            sigma=cfg.get("sigma", point.get("sigma")),
            lambd=cfg.get("lambd", point.get("lambd")),
        )
        return spec.sigma, (spec.lambd if spec.cem else None)
    except (ValueError, TypeError):
        return point.get("sigma"), point.get("lambd")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _unique_dicts(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for p in points:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
