"""What a sweep's stored results say: results.json/csv, the summary, the plots, and the
task-count curve's pre-registered comparisons (each count against 0, the slope past the paper's
critical number, each ablation against its full setting; paired t-intervals over fine-tuning
seeds, Holm-Bonferroni across all). Everything here reads stored rows only (no Ray), so
`muppet-ray sweep report` rebuilds it at any time (sweep.report_from)."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, replace

import scipy.stats

from muppet_ray import protocol
from muppet_ray.storage import RunDir, write_rows

MOST_LISTED = 6  # a sweep step adding more pool tasks than this cannot say which one moved a task
CRITICAL_COUNT = 15  # the paper's critical number of tasks, past which gains grow with the count
FAMILY_ALPHA = 0.05  # family-wise error rate of the pre-registered comparisons (Holm-Bonferroni)


def commit() -> str:
    """The checkout's commit (short), or "unknown"."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

# ------------------------------------------------------------------------ results


def write_results(root: RunDir, rows: list[dict], axis: str, report: str | None = None,
                  command: str = "", commits: list[str] | None = None) -> None:
    """results.json/csv (every fine-tuning run), plots/ and summary.md; with `report`, the
    summary also as that markdown file (dated, with the commits and command) and its plots
    beside it."""
    columns = ["point", "axis_value", "tasks", "replicate", "ablation", "order",
               "prefinetune_seed", "task", "metric", "fraction", "seed", "learning_rate",
               "validation", "test", "train_examples", "steps", "head", "device", "error"]
    write_rows(root, rows, columns)
    order = (json.loads(root.read_text("task_order.json"))["order"]
             if axis == "tasks" and root.exists("task_order.json") else [])
    plots = plot(root, rows, axis)
    root.write_text("summary.md", summary(rows, axis, plots, order))
    print("\n" + summary(rows, axis, plots, order), flush=True)
    if report:
        _write_report(root, rows, axis, order, report, command, plots, commits)


def scores_of(rows: list[dict]) -> list[protocol.Score]:
    """The protocol's scores in a sweep's rows (a failed or unfinished point's row has none)."""
    fields = protocol.Score.__dataclass_fields__
    return [protocol.Score(**{**{k: r[k] for k in fields if k in r}, "model": r["point"]})
            for r in rows if "error" not in r]


def _test_means(rows: list[dict]) -> dict[tuple, float]:
    """(task, point, fraction) -> mean test score over seeds, at the chosen learning rate."""
    groups: dict[tuple, list[float]] = {}
    for s in protocol.chosen(scores_of(rows)):
        groups.setdefault((s.task, s.model, s.fraction), []).append(s.test)
    return {k: statistics.mean(v) for k, v in groups.items()}


def summary(rows: list[dict], axis: str, plots: list[str], order: list[str] = ()) -> str:
    means = _test_means(rows)
    points = list(dict.fromkeys(r["point"] for r in rows))
    seeds = len({r["seed"] for r in rows if "error" not in r})
    lines = [f"# Sweep over {axis}", "",
             f"Test scores x100 (mean over {seeds} seeds) at the fine-tuning learning rate "
             "chosen on validation.", "",
             "| eval task | fraction | " + " | ".join(points) + " |",
             "|---|---|" + "---|" * len(points)]
    for task, fraction in sorted(dict.fromkeys((t, f) for t, _, f in means)):
        cells = [f"{100 * means[(task, p, fraction)]:.1f}" if (task, p, fraction) in means
                 else "-" for p in points]
        lines.append(f"| {task} | {fraction:g} | " + " | ".join(cells) + " |")
    baseline = next((r["point"] for r in rows if "error" not in r
                     and (axis != "tasks" or r["tasks"] == 0)), None)
    found = protocol.differences(scores_of(rows), baseline) if baseline else []
    if found:
        tasks = list(dict.fromkeys(d.task for d in found if d.task != "mean"))
        lines += ["", f"Paired difference to {baseline!r} in points (same subsets and seeds): "
                  "mean ± 95% interval over seeds; **bold** where the interval excludes 0.", "",
                  "| model | fraction | mean over tasks | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        cell = {(d.model, d.task, d.fraction): d for d in found}
        for model, fraction in dict.fromkeys((d.model, d.fraction) for d in found):
            cells = [_cell(cell.get((model, t, fraction))) for t in ["mean", *tasks]]
            lines.append(f"| {model} | {fraction:g} | " + " | ".join(cells) + " |")
    if axis == "tasks":
        lines += comparison_lines(comparisons(rows)) + replicate_lines(rows)
    lines += chosen_rate_lines(rows)
    if axis == "tasks" and order and _test_means(_main(rows)):
        lines += ["", *moved_most(_main(rows), order)]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Points without results (failed, or not finished):"] + [
            f"- {r['point']}: {r['error']}" for r in failed]
    lines += ["", "Plots: " + ", ".join(plots)] if plots else []
    return "\n".join(lines) + "\n"


def _cell(d: protocol.Difference | None) -> str:
    if d is None:
        return "-"
    text = f"{d.mean:+.1f} ± {d.half_width:.1f}"
    return f"**{text}**" if d.significant else text


def chosen_rate_lines(rows: list[dict]) -> list[str]:
    """Per model, eval task and fraction, the fine-tuning learning rate chosen on validation,
    and how often the grid's edges won (an edge's win says the best rate may lie outside)."""
    scores = scores_of(rows)
    grid = sorted({s.learning_rate for s in scores})
    if len(grid) < 2:
        return []
    rate = {(s.model, s.task, s.fraction): s.learning_rate for s in protocol.chosen(scores)}
    cells = sorted({(t, f) for _, t, f in rate})
    listed = ", ".join(f"{r:g}" for r in grid)
    lines = ["", f"The learning rate chosen on validation (grid {listed}), and the cells where "
             "the grid's bottom or top won:", "",
             "| model | " + " | ".join(f"{t} {f:g}" for t, f in cells) + " | bottom | top |",
             "|---|" + "---|" * (len(cells) + 2)]
    for model in dict.fromkeys(m for m, _, _ in rate):
        chosen = [rate.get((model, t, f)) for t, f in cells]
        lines.append(f"| {model} | " + " | ".join(f"{r:g}" if r else "-" for r in chosen)
                     + f" | {chosen.count(grid[0])} | {chosen.count(grid[-1])} |")
    return lines


def moved_most(rows: list[dict], order: list[str]) -> list[str]:
    """Per eval task and fraction, the step of the nested task sets that moved its test score
    most, and the pool tasks that step added (by name where there are few enough for the step
    to say which one did it)."""
    means = _test_means(rows)
    counts = {r["point"]: r["tasks"] for r in rows if "error" not in r}
    lines = ["Which pool tasks' inclusion moved each eval task most (consecutive points):", "",
             "| eval task | fraction | tasks added | change (points) |", "|---|---|---|---|"]
    for task, fraction in sorted({(t, f) for t, _, f in means}):
        curve = sorted((counts[p], v) for (t, p, f), v in means.items()
                       if t == task and f == fraction)
        steps = [(b[1] - a[1], a[0], b[0]) for a, b in zip(curve, curve[1:])]
        if steps:
            change, low, high = max(steps, key=lambda s: abs(s[0]))
            added = (", ".join(order[low:high]) if high - low <= MOST_LISTED else
                     f"tasks {low + 1} to {high} of task_order.json, all at once (counts in "
                     "between would tell them apart)")
            lines.append(f"| {task} | {fraction:g} | {added} | {100 * change:+.1f} |")
    return lines


# ------------------------------------------- the task-count curve's pre-registered comparisons


def _main(rows: list[dict]) -> list[dict]:
    """The rows of the curve's own points (no replicate, no ablation)."""
    return [r for r in rows if not r.get("replicate") and not r.get("ablation")]


def _seed_means(rows: list[dict]) -> dict[tuple[str, float], dict[int, float]]:
    """(point, fraction) -> {fine-tuning seed: test score x100 at the learning rate chosen on
    validation, mean over the eval tasks}; only seeds scored on every eval task."""
    chosen = protocol.chosen(scores_of(rows))
    tasks = {s.task for s in chosen}
    cells: dict[tuple[str, float], dict[int, dict[str, float]]] = {}
    for s in chosen:
        cells.setdefault((s.model, s.fraction), {}).setdefault(s.seed, {})[s.task] = s.test
    return {key: {seed: 100 * statistics.mean(by_task.values())
                  for seed, by_task in sorted(by_seed.items()) if set(by_task) == tasks}
            for key, by_seed in cells.items()}


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    return {seed: a[seed] - b[seed] for seed in a if seed in b}


def curve(rows: list[dict]) -> dict[tuple[int, float], dict[int, float]]:
    """(count, fraction) -> {fine-tuning seed: paired difference to the 0-task point in points,
    mean over the eval tasks and over the count's points that have results (its replicates)}.
    Counts above 0 only; ablations are not on the curve."""
    means = _seed_means(rows)
    points: dict[int, list[str]] = {}
    for r in rows:
        if "tasks" in r and not r.get("ablation"):
            points.setdefault(r["tasks"], [])
            if r["point"] not in points[r["tasks"]]:
                points[r["tasks"]].append(r["point"])
    out = {}
    for count in sorted(set(points) - {0}):
        for fraction in sorted({f for _, f in means}):
            zero = means.get((points.get(0, ["-"])[0], fraction), {})
            each = [_paired(means[p, fraction], zero) for p in points[count]
                    if (p, fraction) in means]
            seeds = set.intersection(*(set(d) for d in each)) if each else set()
            out[count, fraction] = {seed: statistics.mean(d[seed] for d in each)
                                    for seed in sorted(seeds)}
    return out


@dataclass(frozen=True)
class Comparison:
    """One pre-registered comparison of a task-count sweep, paired over fine-tuning seeds: in
    points (a slope: points per 10 tasks), nan where its points have no results."""

    name: str
    fraction: float
    mean: float
    half_width: float  # of the 95% Student-t interval over seeds (per comparison, uncorrected)
    p: float  # two-sided one-sample t-test of the per-seed values against 0
    seeds: int
    p_holm: float = math.nan  # Holm-Bonferroni-adjusted over every comparison of the sweep

    @property
    def holds(self) -> bool:
        """Significant at FAMILY_ALPHA after the correction."""
        return self.p_holm < FAMILY_ALPHA


def paired_test(values: list[float]) -> tuple[float, float, float]:
    """Mean, half-width of the 95% t-interval, and two-sided p of a t-test against 0."""
    if not values:
        return math.nan, math.nan, math.nan
    mean, half = protocol.interval(values)
    if len(values) < 2:
        return mean, half, math.nan
    sd = statistics.stdev(values)
    if sd == 0:
        return mean, half, 1.0 if mean == 0 else 0.0
    t = abs(mean) / (sd / math.sqrt(len(values)))
    return mean, half, float(2 * scipy.stats.t.sf(t, len(values) - 1))


def holm(ps: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values; a comparison without a p (nan) stays in the family
    with p = 1."""
    m = len(ps)
    ranked = sorted(range(m), key=lambda i: ps[i] if math.isfinite(ps[i]) else 1.0)
    adjusted, running = [math.nan] * m, 0.0
    for rank, i in enumerate(ranked):
        p = ps[i] if math.isfinite(ps[i]) else 1.0
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ys against xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
            / sum((x - mx) ** 2 for x in xs))


def comparisons(rows: list[dict]) -> list[Comparison]:
    """The pre-registered comparisons of a task-count sweep, per fraction: each count against
    0 (its replicates averaged); the slope of that difference over the counts past the paper's
    critical number (CRITICAL_COUNT), where there are two or more; and each ablation against
    its count's own point. Holm-Bonferroni over all of them (every fraction)."""
    diff = curve(rows)
    means = _seed_means(rows)
    fractions = sorted({f for _, f in means})
    if not fractions or not any(r.get("tasks") == 0 for r in rows):
        return []
    found = []
    for fraction in fractions:
        counts = sorted(c for c, f in diff if f == fraction)
        for count in counts:
            found.append((f"{count} tasks vs 0", fraction, list(diff[count, fraction].values())))
        past = [c for c in counts if c > CRITICAL_COUNT]
        if len(past) >= 2:
            seeds = set.intersection(*(set(diff[c, fraction]) for c in past))
            slopes = [10 * _slope(past, [diff[c, fraction][s] for c in past])
                      for s in sorted(seeds)]
            found.append((f"slope over {', '.join(map(str, past))} tasks (per 10 tasks)",
                          fraction, slopes))
        found += _against_own_point(rows, means, "ablation", fraction)
    made = [Comparison(name, fraction, *paired_test(values), len(values))
            for name, fraction, values in found]
    return [replace(c, p_holm=p) for c, p in zip(made, holm([c.p for c in made]))]


def _against_own_point(rows: list[dict], means: dict, kind: str,
                       fraction: float) -> list[tuple[str, float, list[float]]]:
    """Each point that is a `kind` ("ablation" or "replicate") of its count, against that
    count's own point: its per-seed paired differences at `fraction` (see _seed_means)."""
    own = {r.get("tasks"): r["point"] for r in _main(rows)}
    found = []
    for point, count in {r["point"]: r.get("tasks") for r in rows if r.get(kind)}.items():
        full = own.get(count, "-")
        values = _paired(means.get((point, fraction), {}), means.get((full, fraction), {}))
        found.append((f"{point} vs {full}", fraction, list(values.values())))
    return found


def replicates(rows: list[dict]) -> list[tuple[str, float, list[float]]]:
    """Per fraction, each replicate (another task order, another pre-finetuning seed) against
    its count's own point, mean over the eval tasks in points: what an order or a seed alone
    moves, the yardstick for the ablations. Descriptive only."""
    means = _seed_means(rows)
    return [found for fraction in sorted({f for _, f in means})
            for found in _against_own_point(rows, means, "replicate", fraction)]


def replicate_lines(rows: list[dict]) -> list[str]:
    found = replicates(rows)
    if not found:
        return []
    lines = ["", "Between replicates (descriptive, not in the family): each replicate's paired "
             "difference to its count's own point, mean over the eval tasks in points ± its 95% "
             "interval over seeds.", "", "| replicate | fraction | difference | seeds |",
             "|---|---|---|---|"]
    for name, fraction, values in found:
        mean, half, _ = paired_test(values)
        text = "no results" if math.isnan(mean) else f"{mean:+.1f} ± {half:.1f}"
        lines.append(f"| {name} | {fraction:g} | {text} | {len(values)} |")
    return lines


def comparison_lines(found: list[Comparison]) -> list[str]:
    if not found:
        return []
    lines = ["", f"The pre-registered comparisons (the curve: each count's replicates averaged): "
             "mean paired difference in points over seeds ± its 95% t-interval, the t-test's "
             f"two-sided p, and p Holm-Bonferroni-adjusted over these {len(found)}; **bold** "
             f"where the adjusted p < {FAMILY_ALPHA:g}.", "",
             "| comparison | fraction | difference | seeds | p | Holm p |",
             "|---|---|---|---|---|---|"]
    for c in found:
        text = "no results" if math.isnan(c.mean) else f"{c.mean:+.1f} ± {c.half_width:.1f}"
        text = f"**{text}**" if c.holds else text
        lines.append(f"| {c.name} | {c.fraction:g} | {text} | {c.seeds} | {c.p:.2g} | "
                     f"{c.p_holm:.2g} |")
    return lines


def _write_report(root: RunDir, rows: list[dict], axis: str, order: list[str], report: str,
                  command: str, plots: list[str], commits: list[str] | None = None) -> None:
    import datetime

    commits = commits or [commit()]
    stem = os.path.splitext(os.path.basename(report))[0]
    directory = os.path.dirname(os.path.abspath(report))
    os.makedirs(directory, exist_ok=True)
    images = []
    for path in plots:
        images.append(f"{stem}-{os.path.basename(path)}")
        with root.open_input(path) as f, open(os.path.join(directory, images[-1]), "wb") as out:
            out.write(f.read())
    body = summary(rows, axis, [], order).split("\n", 1)[1]
    at = ", ".join(f"`{c}`" for c in commits)
    text = (f"# Results: sweep over {axis}\n\n"
            f"Measured {datetime.date.today().isoformat()} at commit{'s' * (len(commits) > 1)} "
            f"{at} with:\n\n```\n{command}\n```\n{body}\n"
            + "".join(f"![{name}]({name})\n" for name in images))
    with open(report + ".part", "w") as f:  # (no half-written report)
        f.write(text)
    os.replace(report + ".part", report)
    print(f"[muppet-ray] report: {report}", flush=True)


def plot(root: RunDir, rows: list[dict], axis: str) -> list[str]:
    """PNGs: the test score against the axis (one line per eval task and fraction; along the
    task count, the curve's own points, the plain backbone's score dashed) and, along the task
    count, the mean paired difference to the plain backbone with its 95% interval
    (plot_difference)."""
    from muppet_ray.plots import png, pyplot

    means = _test_means(_main(rows) if axis == "tasks" else rows)
    if not means:
        return []
    values = {r["point"]: r["axis_value"] for r in rows if "error" not in r}
    tasks = sorted({t for t, _, _ in means})
    fractions = sorted({f for _, _, f in means})
    figure, axes = pyplot().subplots(1, len(fractions), figsize=(5 * len(fractions), 4),
                                     squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        for task in tasks:
            points = sorted((values[p], 100 * v) for (t, p, f), v in means.items()
                            if t == task and f == fraction)
            xs = [x if axis == "tasks" else str(x) for x, _ in points]
            line = ax.plot(xs, [v for _, v in points], marker="o", label=task)[0]
            if axis == "tasks" and points and points[0][0] == 0:
                ax.axhline(points[0][1], color=line.get_color(), linestyle="--", alpha=0.5)
        ax.set_title(f"training fraction {fraction:g}")
        ax.set_xlabel("pre-finetuning tasks (0 = plain backbone, dashed)"
                      if axis == "tasks" else axis)
        ax.set_ylabel("test score x100 (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    figures = {f"{axis}_curve.png": png(figure)}
    if axis == "tasks" and (difference := plot_difference(rows)):
        figures["tasks_difference.png"] = difference
    root.remove("plots")  # (instead of what an earlier report drew)
    for name, data in figures.items():
        root.write_bytes(f"plots/{name}", data)
    return [f"plots/{name}" for name in figures]


def plot_difference(rows: list[dict]) -> bytes | None:
    """PNG, a panel per fraction: the curve (each count's mean paired difference to
    the plain backbone over the eval tasks, its replicates averaged) with its 95% t-interval
    over seeds, each point of a count (replicates included) as a gray dot, and each ablation
    beside its count with its interval. None when there is nothing to draw."""
    from muppet_ray.plots import png, pyplot

    diff = {key: values for key, values in curve(rows).items() if values}
    if not diff:
        return None
    means = _seed_means(rows)
    zero = next(r["point"] for r in _main(rows) if r.get("tasks") == 0)
    points = {r["point"]: (r["tasks"], r.get("ablation", "")) for r in rows
              if "error" not in r and r["tasks"]}
    fractions = sorted({f for _, f in diff})
    figure, axes = pyplot().subplots(1, len(fractions), figsize=(6 * len(fractions), 4.5),
                                     squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        counts = sorted(c for c, f in diff if f == fraction)
        shown = [paired_test(list(diff[c, fraction].values())) for c in counts]
        ax.errorbar([0, *counts], [0.0, *(m for m, _, _ in shown)],
                    yerr=[0.0, *(h if math.isfinite(h) else 0.0 for _, h, _ in shown)],
                    marker="o", capsize=3, label="each count (replicates averaged)")
        offset = 0
        for point, (count, ablation) in points.items():
            values = list(_paired(means.get((point, fraction), {}),
                                  means.get((zero, fraction), {})).values())
            if not values:
                continue
            mean, half, _ = paired_test(values)
            if ablation:
                offset += 1
                ax.errorbar([count + 0.7 * offset], [mean],
                            yerr=[half if math.isfinite(half) else 0.0], marker="s",
                            linestyle="none", capsize=3, label=point)
            else:
                ax.plot([count], [mean], marker=".", color="gray", linestyle="none")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axvline(CRITICAL_COUNT, color="gray", linestyle=":", linewidth=0.8)
        ax.set_title(f"training fraction {fraction:g}")
        ax.set_xlabel(f"pre-finetuning tasks (dotted: the paper's critical {CRITICAL_COUNT}; "
                      "gray: each point)", fontsize=8)
        ax.set_ylabel("paired difference to 0 tasks (points, 95% CI)")
    axes[0][-1].legend(fontsize=7)
    return png(figure)


