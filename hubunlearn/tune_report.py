"""What ``hubunlearn tune`` writes: the trials table (JSON + CSV), the Pareto plot, the parameter-importance plot, the
best setting as a recipe, and (several methods) the comparison table."""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from pathlib import Path
from typing import Any

METRIC_COLUMNS = ("forget_quality", "model_utility", "forget_truth_ratio", "forget_probability", "forget_rouge",
                  "forget_extraction_strength", "retain_probability")


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial: number, state (complete, pruned, fail), feasible (within the budget), params, objective,
    metrics, utility kept (share of the original's model utility; for a pruned trial the retain probe's share at the
    step it was pruned), steps, pruned_at_step, seconds."""
    rows = []
    for trial in study.trials:
        attrs = trial.user_attrs
        complete = trial.state.name == "COMPLETE"
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else None
        rows.append({"number": trial.number, "state": trial.state.name.lower(),
                     "feasible": complete and attrs.get("constraint", 1.0) <= 0, "params": trial.params,
                     "objective": trial.value if complete else None, **{k: (attrs.get("metrics") or {}).get(k) for k in METRIC_COLUMNS},
                     "utility_kept": attrs.get("utility_kept"), "steps": attrs.get("steps"),
                     "pruned_at_step": attrs.get("pruned_at_step"), "seconds": round(seconds, 2) if seconds is not None else None,
                     "error": attrs.get("error")})
    return rows


def _atomic_write(path: Path, text: str | bytes) -> Path:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(text if isinstance(text, bytes) else text.encode())
    temporary.replace(path)
    return path


def csv_text(rows: list[dict], params: list[str]) -> str:
    """The rows flattened: one column per parameter, then the metrics."""
    buffer = io.StringIO()
    columns = ["number", "state", "feasible", *params, "objective", *METRIC_COLUMNS, "utility_kept", "steps", "pruned_at_step", "seconds", "error"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: v for k, v in row.items() if k != "params"}, **row["params"]})
    return buffer.getvalue()


def _figure(width: float = 7.0, height: float = 4.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def pareto_plot(rows: list[dict], path: Path, title: str, objective: str, tau: float, best: int | None,
                original: float | None = None) -> Path:
    """Objective (forget quality on a log scale) against the share of the original's model utility kept, every trial:
    complete ones as dots (the in-budget Pareto front joined), pruned ones as crosses on the bottom edge at the retain
    probe's share when they were pruned, the budget τ as a vertical line, the best trial as a star and the original
    model's ``original`` objective at 1."""
    plt, figure, axes = _figure()
    log = objective == "forget_quality"
    complete = [r for r in rows if r["state"] == "complete" and r["utility_kept"] is not None and r["objective"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["utility_kept"] is not None]
    floor = 1e-300
    values = [max(r["objective"], floor) if log else r["objective"] for r in complete]
    everything = values + ([max(original, floor) if log else original] if original is not None else [])
    for feasible, colour, label in ((True, "tab:blue", "complete, within budget"), (False, "tab:orange", "complete, over budget")):
        points = [(r["utility_kept"], v) for r, v in zip(complete, values) if r["feasible"] == feasible]
        if points:
            axes.scatter(*zip(*points), color=colour, s=36, zorder=3, label=label)
    if original is not None:
        axes.scatter([1.0], [max(original, floor) if log else original], marker="D", color="0.5", s=30, zorder=2,
                     label="original model")
    from .tune import OBJECTIVES

    front = _front([(r["utility_kept"], v) for r, v in zip(complete, values)], maximize=OBJECTIVES[objective][0] == "maximize")
    if len(front) > 1:
        axes.plot(*zip(*front), color="tab:blue", alpha=0.4, linewidth=1, zorder=2, label="Pareto front")
    if everything:
        low, high = min(everything), max(everything)
        if log:
            bottom = 10 ** (math.floor(math.log10(low)) - 1)
            axes.set_yscale("log")
            axes.set_ylim(bottom, max(1.5, high * 2))
        else:
            span = (high - low) or abs(high) or 1.0
            bottom = low - 0.15 * span
            axes.set_ylim(bottom, high + 0.1 * span)
    else:
        bottom = 1e-3 if log else 0.0
        if log:
            axes.set_yscale("log")
    if pruned:
        axes.scatter([r["utility_kept"] for r in pruned], [bottom] * len(pruned), marker="x", color="tab:red", s=40, zorder=3,
                     clip_on=False, label="pruned (retain probe's share at pruning; not evaluated)")
    best_row = next((r for r, v in zip(complete, values) if r["number"] == best), None)
    if best_row is not None:
        axes.scatter([best_row["utility_kept"]], [max(best_row["objective"], floor) if log else best_row["objective"]], marker="*",
                     s=260, facecolor="gold", edgecolor="black", zorder=4, label=f"best within budget (trial {best})")
    axes.axvline(tau, color="tab:red", linestyle="--", linewidth=1, label=f"budget τ = {tau:g}")
    labels: dict[tuple, list] = {}  # trials at about the same point (3 decimals of utility, 2 digits) share one label
    for r, v in zip(complete, values):
        labels.setdefault((round(r["utility_kept"], 3), float(f"{v:.2g}")), []).append((r["utility_kept"], v, str(r["number"])))
    if labels:
        from .bench import place_labels

        place_labels(axes, figure, [trials[0][:2] for trials in labels.values()],
                     [", ".join(t[2] for t in trials) for trials in labels.values()], ["0.3"] * len(labels), fontsize=7)
    axes.set_xlabel("model utility kept (share of the original's)")
    axes.set_ylabel(objective.replace("_", " ") + (" (log scale)" if log else ""))
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _front(points: list[tuple[float, float]], maximize: bool) -> list[tuple[float, float]]:
    """The non-dominated points (more utility kept, better objective), sorted by utility kept."""
    better = (lambda a, b: a >= b) if maximize else (lambda a, b: a <= b)
    front = [p for p in points if not any(q != p and q[0] >= p[0] and better(q[1], p[1]) for q in points)]
    return sorted(set(front))


def importances(study, objective: str) -> dict[str, float] | str:
    """Optuna's parameter importances (fANOVA) of the objective over the complete trials (forget quality by its
    log10); a sentence saying why when they cannot be computed."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    distinct = {t.value for t in complete}
    if len(complete) < 2 or len(distinct) < 2:
        return f"needs at least two complete trials with different results ({len(complete)} complete, {len(distinct)} distinct)"
    target = (lambda t: math.log10(max(t.value, 1e-300))) if objective == "forget_quality" else None
    try:
        return optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as error:
        return f"Optuna could not compute them: {error}"


def importance_plot(values: dict[str, float] | str, path: Path, title: str, complete_trials: int = 10) -> Path:
    plt, figure, axes = _figure(6.0, 3.6)
    if isinstance(values, str):
        axes.text(0.5, 0.5, f"Parameter importance not available:\n{values}", ha="center", va="center", wrap=True, fontsize=9)
        axes.set_axis_off()
    else:
        names = list(values)[::-1]
        axes.barh(names, [values[n] for n in names], color="tab:blue")
        for y, name in enumerate(names):
            axes.text(values[name], y, f" {values[name]:.2f}", va="center", fontsize=8)
        axes.set_xlim(0, max(1.0, max(values.values()) * 1.15))
        axes.set_xlabel("importance (fANOVA, share of the objective's variance)")
        if complete_trials < 10:  # fANOVA's forest on a handful of points: an indication, not a ranking
            axes.text(0.99, 0.02, f"only {complete_trials} complete trials: indicative", transform=axes.transAxes, ha="right",
                      va="bottom", fontsize=8, color="tab:red")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def write_reports(study, search, config, evaluation, best) -> dict[str, Path]:
    """``trials.json``, ``trials.csv``, ``pareto.png``, ``importance.png`` and (when a trial met the budget)
    ``best.yaml`` in the method's folder."""
    from .search_spaces import describe
    from .tune import BEST_MODEL, OBJECTIVES, recipe_for, write_recipe

    folder = search.directory
    rows = trial_rows(study)
    importance = importances(study, config.objective)
    table = {"method": search.method, "objective": config.objective, "direction": OBJECTIVES[config.objective][0],
             "utility_budget": config.utility_budget, "space": describe(search.space), "original": evaluation.original,
             "best_trial": best.number if best else None, "importance": importance, "trials": rows}
    files = {"json": _atomic_write(folder / "trials.json", json.dumps(table, indent=2) + "\n"),
             "csv": _atomic_write(folder / "trials.csv", csv_text(rows, list(search.space)))}
    counts = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "fail")}
    title = (f"{search.method}: {_count(len(rows), 'trial')} ({counts['complete']} complete, {counts['pruned']} pruned"
             + (f", {counts['fail']} failed" if counts["fail"] else "") + f"), budget {config.utility_budget:g}× model utility")
    files["pareto"] = pareto_plot(rows, folder / "pareto.png", title, config.objective, config.utility_budget,
                                   best.number if best else None, evaluation.original.get(config.objective))
    files["importance"] = importance_plot(importance, folder / "importance.png", f"{search.method}: parameter importance for {config.objective}",
                                          counts["complete"])
    if best is not None:
        metrics = best.user_attrs["metrics"]
        header = (f"hubunlearn tune: the best of {_count(len(rows), 'trial')} of {search.method} (trial {best.number}), seed {search.settings.get('seed')}\n"
                  f"{config.objective} {best.value:.6g}, model utility {metrics['model_utility']:.6g} "
                  f"({best.user_attrs['utility_kept']:.4f}× the original's; budget {config.utility_budget:g}×)\n"
                  f"run it: hubunlearn unlearn --config {shlex.quote(str(folder / 'best.yaml'))}")
        files["best"] = write_recipe(folder / "best.yaml", recipe_for(search, best.params, str(folder / BEST_MODEL)), header)
    else:
        (folder / "best.yaml").unlink(missing_ok=True)  # an earlier session's best no longer describes this study
    return files


def write_comparison(studies: dict, config, evaluation, output: Path) -> list[dict]:
    """``comparison.json`` / ``comparison.csv``: each method at its best setting within the budget."""
    from .tune import best_trial

    rows = []
    for method, study in studies.items():
        best = best_trial(study, config.utility_budget)
        states = [t.state.name.lower() for t in study.trials]
        metrics = best.user_attrs["metrics"] if best else {}
        rows.append({"method": method, "trials": len(states), "complete": states.count("complete"), "pruned": states.count("pruned"),
                     "within_budget": sum(1 for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("constraint", 1.0) <= 0),
                     "best_trial": best.number if best else None, "objective": best.value if best else None,
                     "forget_quality": metrics.get("forget_quality"), "model_utility": metrics.get("model_utility"),
                     "utility_kept": best.user_attrs.get("utility_kept") if best else None,
                     "params": best.params if best else None})
    _atomic_write(output / "comparison.json", json.dumps({"objective": config.objective, "utility_budget": config.utility_budget,
                                                          "original": evaluation.original, "methods": rows}, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "params": json.dumps(r["params"])} for r in rows)
    _atomic_write(output / "comparison.csv", buffer.getvalue())
    return rows


def comparison_table(rows: list[dict], objective: str) -> str:
    """The comparison as a Markdown table."""
    lines = [f"| method | trials (pruned) | within budget | best {objective} | model utility kept |", "|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['objective']:.3g}" if r["objective"] is not None else "none within budget"
        kept = f"{r['utility_kept']:.3f}" if r["utility_kept"] is not None else "–"
        lines.append(f"| {r['method']} | {r['trials']} ({r['pruned']}) | {r['within_budget']} | {value} | {kept} |")
    return "\n".join(lines)
