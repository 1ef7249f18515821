"""The task-count curve's points (further task orders, pre-finetuning seeds, ablations at the
largest count), its pre-registered comparisons (replicates averaged, the slope past the critical
number, ablations against their full setting, Holm-Bonferroni) and its report, rewritten from
the stored results alone. No Ray: nothing here starts a cluster."""

import json
import math

import pytest
import scipy.stats

from muppet_ray.config import Config
from muppet_ray.errors import ConfigError, TrainingError
from muppet_ray.storage import RunDir
from muppet_ray.sweep import (
    _check_orders,
    _described,
    check_finished,
    parse_ablations,
    record_points,
    report_from,
    task_points,
)
from muppet_ray.sweep_report import (
    chosen_rate_lines,
    comparisons,
    curve,
    holm,
    paired_test,
    replicates,
)

POOL = [f"t{i}" for i in range(10)]
ABLATIONS = [("batching.strategy", "homogeneous"), ("training.loss_scaling", False)]


def points(**changes):
    args = dict(pool=POOL, counts=[0, 2, 4, 10], task_seeds=[0, 1], prefinetune_seeds=[0, 1],
                training_seed=0, ablations=ABLATIONS)
    return task_points(**{**args, **changes})


def test_points_of_the_curve_its_replicates_and_ablations():
    orders, found = points()
    by_label = {p["label"]: p for p in found}
    assert list(by_label) == [
        "0 tasks", "2 tasks", "4 tasks", "10 tasks",  # the curve, in the first order
        "2 tasks, order 1", "4 tasks, order 1",  # the second order between 0 and the pool
        "10 tasks, seed 1",  # a second pre-finetuning seed at the largest count
        "10 tasks, batching.strategy=homogeneous", "10 tasks, training.loss_scaling=false"]
    assert len(found) == len(by_label)  # labels unique
    # each order's subsets are nested, and the orders differ
    for seed, suffix in [(0, ""), (1, ", order 1")]:
        two, four = by_label[f"2 tasks{suffix}"]["tasks"], by_label[f"4 tasks{suffix}"]["tasks"]
        assert four[:2] == two and four == orders[seed][:4]
    assert orders[0] != orders[1] and sorted(orders[1]) == sorted(POOL)
    assert by_label["4 tasks"]["tasks"] != by_label["4 tasks, order 1"]["tasks"]
    assert by_label["0 tasks"]["tasks"] == [] and by_label["10 tasks"]["tasks"] == orders[0]
    # the replicates and ablations: the largest count's tasks, one setting each
    assert by_label["10 tasks, seed 1"]["settings"] == {"training.seed": 1}
    assert by_label["10 tasks, batching.strategy=homogeneous"]["settings"] == {
        "batching.strategy": "homogeneous"}
    assert by_label["10 tasks, training.loss_scaling=false"]["settings"] == {
        "training.loss_scaling": False}
    for label in ("10 tasks, seed 1", "10 tasks, training.loss_scaling=false"):
        assert by_label[label]["tasks"] == orders[0]
    assert all(p["settings"] == {} for p in found[:6])
    # what each point is, as its rows will say
    assert [(p["replicate"], p["ablation"]) for p in found[-5:]] == [
        ("order 1", ""), ("order 1", ""), ("seed 1", ""),
        ("", "batching.strategy=homogeneous"), ("", "training.loss_scaling=false")]
    assert by_label["2 tasks, order 1"]["order"] == 1
    assert by_label["10 tasks, seed 1"]["prefinetune_seed"] == 1
    assert _described(by_label["4 tasks, order 1"]) == {
        "point": "4 tasks, order 1", "axis_value": 4, "tasks": 4, "replicate": "order 1",
        "ablation": ""}
    # one task seed, one pre-finetuning seed, no ablation: the sweep as before
    _, plain = points(task_seeds=[3], prefinetune_seeds=[], ablations=[])
    assert [p["label"] for p in plain] == ["0 tasks", "2 tasks", "4 tasks", "10 tasks"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"task_seeds": [0, 0]}, "--task-seed: expected distinct"),
    ({"prefinetune_seeds": [1, 2]}, r"one of them training\.seed \(0\)"),
    ({"counts": [0]}, "it needs a count above 0"),
])
def test_bad_points(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        points(**changes)


def test_ablations_are_checked_settings_of_pre_finetuning():
    base = Config()
    assert parse_ablations(base, ["batching.strategy=homogeneous",
                                  "training.loss_scaling=false"]) == ABLATIONS
    for item, expected in [("loss_scaling", "expected section.key=value"),
                           ("protocol.head=new", "changes pre-finetuning"),
                           ("tasks.include=[a]", "changes pre-finetuning"),
                           ("batching.strategy=heterogeneous", "already heterogeneous"),
                           ("batching.strategy=bogus", "batching.strategy"),
                           ("training.nonsense=1", "unknown setting")]:
        with pytest.raises(ConfigError, match=expected):
            parse_ablations(base, [item])
    with pytest.raises(ConfigError, match="given twice"):
        parse_ablations(base, ["training.loss_scaling=false", "training.loss_scaling=false"])


def test_paired_test_and_holm():
    values = [1.0, 2.5, 0.5, 3.0, 1.5]
    mean, half, p = paired_test(values)
    assert mean == pytest.approx(1.7)
    assert p == pytest.approx(scipy.stats.ttest_1samp(values, 0).pvalue)
    assert half == pytest.approx(scipy.stats.t.ppf(0.975, 4) * scipy.stats.sem(values))
    assert paired_test([0.0, 0.0])[2] == 1.0 and math.isnan(paired_test([])[0])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1, each at least the one before
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, math.nan]) == [0.02, 1.0]  # (no p: stays in the family, as 1)


SEEDS = range(5)
# point -> (count, replicate, ablation, its gain over the plain backbone in points)
GAINS = {"0 tasks": (0, "", "", 0.0), "4 tasks": (4, "", "", -2.0),
         "4 tasks, order 1": (4, "order 1", "", -4.0), "16 tasks": (16, "", "", 1.0),
         "27 tasks": (27, "", "", 4.0), "27 tasks, seed 1": (27, "seed 1", "", 6.0),
         "27 tasks, batching.strategy=homogeneous": (27, "", "batching.strategy=homogeneous", 1.0)}


def rows_of(point: str) -> list[dict]:
    count, replicate, ablation, gain = GAINS[point]
    rows = []
    for task, base in [("a", 0.50), ("b", 0.70)]:
        for fraction in (0.1, 1.0):
            for seed in SEEDS:
                # the seed moves every model alike (paired), plus a little of its own noise
                test = base + 0.01 * seed + gain / 100 + 0.001 * ((seed * 7 + count) % 3 - 1)
                for lr, shift in [(1e-4, 0.0), (3e-4, -0.05)]:  # 1e-4 wins on validation
                    rows.append({"point": point, "axis_value": count, "tasks": count,
                                 "replicate": replicate, "ablation": ablation, "task": task,
                                 "metric": "accuracy", "fraction": fraction, "seed": seed,
                                 "learning_rate": lr, "validation": 0.6 + shift,
                                 "test": test + shift, "train_examples": 10, "steps": 3,
                                 "head": "new"})
    return rows


def test_comparisons_average_replicates_and_correct_for_the_family():
    rows = [r for point in GAINS for r in rows_of(point)]
    diff = curve(rows)
    assert sorted(diff) == [(c, f) for c in (4, 16, 27) for f in (0.1, 1.0)]
    assert statistics_mean(diff[4, 0.1]) == pytest.approx(-3.0, abs=0.2)  # (-2 + -4) / 2
    assert statistics_mean(diff[27, 1.0]) == pytest.approx(5.0, abs=0.2)  # (4 + 6) / 2
    found = comparisons(rows)
    names = [c.name for c in found if c.fraction == 0.1]
    assert names == ["4 tasks vs 0", "16 tasks vs 0", "27 tasks vs 0",
                     "slope over 16, 27 tasks (per 10 tasks)",
                     "27 tasks, batching.strategy=homogeneous vs 27 tasks"]
    assert len(found) == 10  # both fractions, one family
    by = {(c.name, c.fraction): c for c in found}
    slope = by["slope over 16, 27 tasks (per 10 tasks)", 0.1]
    assert slope.mean == pytest.approx(10 * (5.0 - 1.0) / 11, abs=0.2)
    ablation = by["27 tasks, batching.strategy=homogeneous vs 27 tasks", 1.0]
    assert ablation.mean == pytest.approx(-3.0, abs=0.2) and ablation.seeds == 5
    # (Holm over the whole family of 10, both fractions at once; holm() itself is checked
    # against hand-computed values)
    assert [c.p_holm for c in found] == pytest.approx(holm([c.p for c in found]))
    assert by["27 tasks vs 0", 0.1].holds  # a large, steady gain holds after the correction
    # a point without results stays in the family, as a comparison without a value
    failed = [r for r in rows if r["point"] != "16 tasks"] + [
        {"point": "16 tasks", "axis_value": 16, "tasks": 16, "replicate": "", "ablation": "",
         "error": "no results"}]
    again = {(c.name, c.fraction): c for c in comparisons(failed)}
    assert len(again) == 10 and math.isnan(again["16 tasks vs 0", 0.1].mean)
    assert math.isnan(again["slope over 16, 27 tasks (per 10 tasks)", 0.1].mean)
    assert again["16 tasks vs 0", 0.1].p_holm == 1.0
    assert [c.p_holm for c in again.values()] == pytest.approx(
        holm([c.p for c in again.values()]))


def statistics_mean(by_seed: dict) -> float:
    return sum(by_seed.values()) / len(by_seed)


def test_the_replicates_spread_and_the_chosen_learning_rates_are_reported():
    rows = [r for point in GAINS for r in rows_of(point)]
    # what an order or a seed alone moves: each replicate against its count's own point
    found = {(name, fraction): values for name, fraction, values in replicates(rows)}
    assert sorted(found) == [(f"{n} vs {c}", f) for n, c in [
        ("27 tasks, seed 1", "27 tasks"), ("4 tasks, order 1", "4 tasks")] for f in (0.1, 1.0)]
    assert found["4 tasks, order 1 vs 4 tasks", 0.1] == pytest.approx([-2.0] * 5)  # -4 - -2
    assert found["27 tasks, seed 1 vs 27 tasks", 1.0] == pytest.approx([2.0] * 5)  # 6 - 4
    # validation picks 3e-4 for one cell of one model: that cell, and its count as the top's
    for r in rows:
        if (r["point"], r["task"], r["fraction"], r["learning_rate"]) == (
                "16 tasks", "b", 1.0, 3e-4):
            r["validation"] = 0.9
    lines = chosen_rate_lines(rows)
    assert "(grid 0.0001, 0.0003)" in lines[1]
    assert "| model | a 0.1 | a 1 | b 0.1 | b 1 | bottom | top |" in lines
    assert "| 16 tasks | 0.0001 | 0.0001 | 0.0001 | 0.0003 | 3 | 1 |" in lines
    assert "| 0 tasks | 0.0001 | 0.0001 | 0.0001 | 0.0001 | 4 | 0 |" in lines
    assert chosen_rate_lines([r for r in rows if r["learning_rate"] == 1e-4]) == []  # no choice


def test_the_report_is_rewritten_from_the_stored_results_alone(tmp_path):
    root = RunDir(str(tmp_path / "curve"))
    described = [{"point": p, "axis_value": c, "tasks": c, "replicate": r, "ablation": a}
                 for p, (c, r, a, _) in GAINS.items()]
    assert record_points(root, "tasks", described, "muppet-ray sweep tasks ...")
    for point in GAINS:
        if point != "16 tasks":  # (still running)
            slug = point.replace(", ", "-").replace(" ", "-").replace("=", "-")
            root.write_text(f"{slug}-results.json", json.dumps(rows_of(point)))
    root.write_text("task_order.json", json.dumps({"seed": 0, "order": POOL}))
    report = tmp_path / "docs" / "curve.md"
    rows = report_from(root.root, str(report))
    assert {r["point"] for r in rows if "error" in r} == {"16 tasks"}
    text = report.read_text()
    assert "muppet-ray sweep tasks ..." in text and "at commit `" in text
    assert "| 27 tasks vs 0 | 0.1 | **+5.0 ± " in text
    assert "| 16 tasks vs 0 | 0.1 | no results | 0 | nan | 1 |" in text
    assert "- 16 tasks: no results" in text
    assert "| 4 tasks, order 1 vs 4 tasks | 0.1 | -2.0 ± 0.0 | 5 |" in text
    assert "| 27 tasks | 0.0001 | 0.0001 | 0.0001 | 0.0001 | 4 | 0 |" in text
    for plot in ("curve-tasks_curve.png", "curve-tasks_difference.png"):
        assert f"![{plot}]({plot})" in text
        assert (tmp_path / "docs" / plot).stat().st_size > 1000
    assert (tmp_path / "curve" / "plots" / "tasks_difference.png").is_file()
    assert json.loads((tmp_path / "curve" / "results.json").read_text()) == rows


def test_a_restorable_sweep_keeps_its_points(tmp_path):
    root = RunDir(str(tmp_path / "curve"))
    first = [{"point": "0 tasks"}, {"point": "4 tasks"}]
    record_points(root, "tasks", first, "first")
    record_points(root, "tasks", [*first, {"point": "8 tasks"}], "grown")  # (Tune has no state)
    (tmp_path / "curve" / "tune").mkdir()
    (tmp_path / "curve" / "tune" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match="Run it with the points it was started with"):
        record_points(root, "tasks", first, "shrunk")
    assert json.loads(root.read_text("sweep.json"))["command"] == "grown"
    root.write_text("task_order.json", json.dumps({"seed": 0, "order": POOL}))
    _check_orders(root, {"seed": 0, "order": POOL, "orders": {"0": POOL}})  # (the same)
    with pytest.raises(ConfigError, match="started with other task orders"):
        _check_orders(root, {"seed": 1, "order": POOL[::-1], "orders": {"1": POOL[::-1]}})
    with pytest.raises(ConfigError, match="labels must be unique"):
        record_points(RunDir(str(tmp_path / "other")), "tasks", first + first[:1], "x")


def test_tasks_also_are_mixed_in_but_not_in_the_pool():
    # A denoising task beside the pool: in the run's tasks, out of a task-count sweep's pool
    # (where only --ablate tasks.also=[...] adds it, to one point).
    from muppet_ray.tasks import resolve_tasks

    noise = {"name": "noise", "type": "denoising", "format": "text", "train": "corpus.txt"}
    base = Config().replace({"tasks.custom": [noise], "tasks.include": ["sentiment", "topic"]})
    also = base.replace({"tasks.also": ["noise"]})
    assert [t.name for t in resolve_tasks(also)] == ["sentiment", "topic", "noise"]
    assert [t.name for t in resolve_tasks(base)] == ["sentiment", "topic"]
    assert parse_ablations(base, ["tasks.also=[noise]"]) == [("tasks.also", ["noise"])]
    # with tasks.include empty, the default mixture takes every custom task but those
    default = Config().replace({"tasks.custom": [noise], "tasks.also": ["noise"]})
    assert [t.name for t in resolve_tasks(default)].count("noise") == 1
    with pytest.raises(ConfigError, match="tasks.also: unknown task or family 'nois'"):
        resolve_tasks(base.replace({"tasks.also": ["nois"]}))
    with pytest.raises(ConfigError, match=r"tasks.include, tasks.also: tasks listed twice: "
                                          r"\['topic'\]"):
        resolve_tasks(base.replace({"tasks.also": ["topic"]}))


def test_a_stopped_sweep_says_its_points_did_not_finish_not_that_they_failed():
    rows = [{"point": "0 tasks", "test": 0.5}, {"point": "0 tasks", "test": 0.6},
            {"point": "4 tasks", "error": "no results"},
            {"point": "8 tasks", "error": "no results"}]
    with pytest.raises(TrainingError, match=r"^2 of 3 sweep points not finished \(the sweep was "
                       r"stopped; the same command resumes it\): 4 tasks, 8 tasks \(results: r\)$"):
        check_finished(rows, {}, "r")
    failed = [*rows[:3], {"point": "8 tasks", "error": "ValueError: bad"}]
    with pytest.raises(TrainingError, match=r"^1 of 3 sweep points failed: 8 tasks: ValueError: "
                                            r"bad \(results: r\)$"):
        check_finished(failed, {"8 tasks": "ValueError: bad"}, "r")
    check_finished(rows[:2], {}, "r")  # all finished: nothing to say
