"""Mixture weights for each rule, and the composition each batching strategy promises."""

import pickle

import numpy as np
import pytest

from muppet_ray.config import BatchingConfig, MixtureConfig
from muppet_ray.mixture import (
    OnlineMixture,
    allocate,
    build_schedule,
    examples_per_micro_batch,
    mixture_weights,
    weights_plot,
)

SIZES = {"a": 8000, "b": 2000, "c": 500, "d": 100}


def test_weight_rules():
    proportional = mixture_weights(SIZES, MixtureConfig())
    assert proportional == pytest.approx({t: n / 10600 for t, n in SIZES.items()})
    capped = mixture_weights(SIZES, MixtureConfig(cap=1000))
    assert capped == pytest.approx({"a": 1000 / 2600, "b": 1000 / 2600, "c": 500 / 2600,
                                    "d": 100 / 2600})
    temperature = mixture_weights(SIZES, MixtureConfig(rule="temperature", temperature=2.0))
    roots = {t: n ** 0.5 for t, n in SIZES.items()}
    assert temperature == pytest.approx({t: r / sum(roots.values()) for t, r in roots.items()})
    assert mixture_weights(SIZES, MixtureConfig(rule="uniform")) == pytest.approx(
        dict.fromkeys(SIZES, 0.25))
    explicit = MixtureConfig(rule="explicit", weights={"a": 1, "b": 1, "c": 2, "d": 0})
    assert mixture_weights(SIZES, explicit) == pytest.approx({"a": .25, "b": .25, "c": .5,
                                                              "d": 0})


def test_allocate_sums_exactly():
    counts = allocate({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100)
    assert sum(counts.values()) == 100 and sorted(counts.values()) == [33, 33, 34]


def schedule(strategy="heterogeneous", workers=2, accum=4, steps=200, seed=0, **mixture):
    chunks = [n // 16 for n in SIZES.values()]
    batching = BatchingConfig(strategy=strategy, grad_accum_steps=accum, micro_batch_size=16)
    return build_schedule(chunks, list(SIZES.values()), MixtureConfig(**mixture), batching,
                          workers * accum, steps, seed)


def test_schedule_length_and_worker_positions():
    s = schedule(workers=3, accum=2, steps=50)
    assert len(s) == 50 * 3 * 2
    owned = sorted(p for r in range(3) for p in s.worker_positions(r, 3))
    assert owned == list(range(len(s)))
    assert list(s.worker_positions(1, 3, start_step=10))[:3] == [61, 64, 67]  # (p % 3 == 1)
    assert list(s.step_positions(10)) == list(range(60, 66))
    # Elastic: restarted with 2 workers at step 10, they share the same positions from 60 on
    # (the schedule does not depend on the worker count: 6 micro-batches a step either way).
    assert schedule(workers=2, accum=3, steps=50).task.tolist() == s.task.tolist()
    rest = sorted(p for r in range(2) for p in s.worker_positions(r, 2, start_step=10))
    assert rest == list(range(60, len(s)))


def test_a_steps_largest_micro_batches_go_to_different_workers():
    s = schedule(workers=2, accum=4, steps=100)  # 8 micro-batches a step
    rng = np.random.default_rng(0)
    cost = np.where(rng.random(len(s)) < 0.2, 30.0, 1.0) * rng.uniform(1, 2, len(s))
    for world in (1, 2, 4, 8):
        shares = [s.worker_positions(r, world, cost=cost).reshape(100, -1) for r in range(world)]
        # every step's positions, once each, per_step / world per worker, whatever the count
        steps = np.sort(np.concatenate(shares, axis=1), axis=1)
        assert (steps == np.arange(len(s)).reshape(100, 8)).all()
    balanced = np.stack([cost[s.worker_positions(r, 2, cost=cost)].reshape(100, -1).sum(1)
                         for r in range(2)])
    round_robin = np.stack([cost[s.worker_positions(r, 2)].reshape(100, -1).sum(1)
                            for r in range(2)])
    # A step lasts as long as its busiest worker: dealt out p % W, steps here take 1.48x their
    # work spread evenly; balanced, 1.27x (as even as 4 micro-batches a worker allow).
    assert balanced.max(0).sum() < 0.9 * round_robin.max(0).sum()
    assert balanced.max(0).sum() < 1.3 * balanced.mean(0).sum()


def test_heterogeneous_micro_batches_are_single_task_and_steps_mix_tasks():
    s = schedule(accum=4, rule="uniform")
    assert s.task.shape[1] == 1
    tasks_per_step = [len(set(s.task[s.step_positions(i), 0])) for i in range(200)]
    assert min(tasks_per_step) == 4  # 8 micro-batches per update: all four tasks in each


def test_mixture_fidelity_over_windows():
    """Each task's share over any window of a few hundred micro-batches matches its target."""
    sizes = {f"t{i}": 300 * (1 + i % 7) for i in range(30)}
    chunks = [n // 16 for n in sizes.values()]
    s = build_schedule(chunks, list(sizes.values()), MixtureConfig(), BatchingConfig(), 4, 2000,
                       seed=3)
    target = np.array(list(sizes.values())) / sum(sizes.values())
    tasks = s.task[:, 0]
    for window in (200, 500):
        worst = max(
            np.abs(np.bincount(tasks[i:i + window], minlength=30) - window * target).max()
            for i in range(0, len(tasks) - window, 37)
        )
        assert worst <= 2.0, (window, worst)  # within two micro-batches of the target count


def test_homogeneous_updates_hold_one_task():
    s = schedule(strategy="homogeneous", accum=4)
    for step in range(200):
        assert len(set(s.task[s.step_positions(step), 0])) == 1
    assert len(set(s.task[:, 0])) == 4


def test_sequential_runs_tasks_one_after_another():
    s = schedule(strategy="sequential")
    order = [t for i, t in enumerate(s.task[:, 0]) if i == 0 or t != s.task[i - 1, 0]]
    assert order == [0, 1, 2, 3]


def test_mixed_micro_batches_hold_several_tasks():
    chunks = [n // 4 for n in SIZES.values()]
    batching = BatchingConfig(strategy="mixed", micro_batch_size=16, tasks_per_micro_batch=4)
    s = build_schedule(chunks, list(SIZES.values()), MixtureConfig(rule="uniform"), batching,
                       4, 100, 0)
    assert s.task.shape == (100 * 2 * 2, 4)
    assert np.mean([len(set(row)) for row in s.task]) > 2.5


def test_deterministic_for_a_seed():
    a, b, c = schedule(seed=1), schedule(seed=1), schedule(seed=2)
    assert np.array_equal(a.task, b.task) and np.array_equal(a.chunk, b.chunk)
    assert not np.array_equal(a.chunk, c.chunk)


def test_each_pass_visits_every_chunk_once():
    s = schedule(steps=400)  # several passes over the small tasks
    for task, num_chunks in enumerate(n // 16 for n in SIZES.values()):
        mine = s.task[:, 0] == task
        for epoch in np.unique(s.epoch[mine]):
            visited = s.chunk[mine & (s.epoch[:, 0] == epoch), 0]
            assert len(set(visited)) == len(visited)  # no chunk twice within a pass
            if epoch < s.epoch[mine].max():
                assert sorted(visited) == list(range(num_chunks))  # complete passes


def test_a_token_budget_draws_each_tasks_examples_by_its_weight():
    # Chunks cut by a token budget: a short task's hold more examples (here about 64, 16, 32
    # and 8 on average).
    chunks = [8000 // 64, 2000 // 16, 500 // 32, 100 // 8]
    per_chunk = np.array(list(SIZES.values())) / chunks
    for mixture in (MixtureConfig(), MixtureConfig(rule="uniform"),
                    MixtureConfig(rule="temperature", temperature=2.0)):
        for strategy in ("heterogeneous", "homogeneous"):
            on = BatchingConfig(strategy=strategy, grad_accum_steps=4,
                                tokens_per_micro_batch=2048)
            s = build_schedule(chunks, list(SIZES.values()), mixture, on, 8, 400, 0,
                               list(SIZES))
            drawn = np.bincount(s.task[:, 0], minlength=4) * per_chunk
            weights = np.array(list(mixture_weights(SIZES, mixture).values()))
            # within rounding: one unit (a step's worth of micro-batches, homogeneous) of the
            # task with the fullest chunks
            unit = 8 if strategy == "homogeneous" else 1
            assert np.abs(drawn / drawn.sum() - weights).max() <= unit * 64 / drawn.sum()
            mean = examples_per_micro_batch(chunks, list(SIZES.values()), mixture, on)
            assert mean == pytest.approx(drawn.sum() / len(s), rel=0.02)
            # off: chunks are drawn by the weights themselves (the examples would follow
            # w_t x examples per chunk)
            off = build_schedule(chunks, list(SIZES.values()), mixture,
                                 BatchingConfig(strategy=strategy, grad_accum_steps=4), 8, 400,
                                 0, list(SIZES))
            assert np.abs(np.bincount(off.task[:, 0], minlength=4) / len(off) - weights).max() \
                <= unit / len(off)
    assert examples_per_micro_batch(chunks, list(SIZES.values()), MixtureConfig(),
                                    BatchingConfig(micro_batch_size=16)) == 16.0


# ------------------------------------------------------------------ online mixing


def online(**settings) -> OnlineMixture:
    config = MixtureConfig(rule="online", **settings)
    return OnlineMixture.of_run(list(mixture_weights(SIZES, config).values()), config)


def test_online_weights_move_towards_the_task_whose_loss_is_high():
    mixing = online(online_rate=1.0, online_floor=0.25)
    prior = np.array(mixing.decided[0])
    assert prior == pytest.approx(np.array(list(SIZES.values())) / 10600)  # proportional first
    examples = np.array([64.0, 16, 8, 2])
    for _ in range(6):  # task c's loss made high (log n-scaled: 1 = chance), the others learnt
        mixing.add(np.array([0.1, 0.1, 2.0, 0.1]) * examples, examples)
        weights = np.array(mixing.decide())
        assert weights.sum() == pytest.approx(1)
    history = np.array(mixing.decided)
    assert (np.diff(history[:, 2]) > 0).all() and history[-1, 2] > 0.5  # c grows every time
    # nobody starved: each keeps at least a quarter of its proportional weight
    assert (history[-1] >= 0.25 * prior - 1e-12).all()
    # a task that drew no example in an interval moves as the mean of the others
    mixing.add(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.0, 0.0]))
    before = mixing.scores.copy()
    mixing.decide()
    assert mixing.scores[2:] - before[2:] == pytest.approx([1.0, 1.0])
    # rate 0: the weights stay proportional
    still = online(online_rate=0.0)
    still.add(np.array([0.1, 0.1, 2.0, 0.1]), np.ones(4))
    assert still.decide() == pytest.approx(list(prior))


def test_online_mixture_state_round_trips_through_a_checkpoint():
    mixing = online()
    mixing.add(np.array([3.0, 1.0, 0.5, 0.2]), np.array([4.0, 2.0, 1.0, 1.0]))
    mixing.decide()
    mixing.add(np.array([0.7, 0.0, 0.0, 0.9]), np.array([1.0, 0.0, 0.0, 1.0]))  # (mid-interval)
    state = pickle.loads(pickle.dumps(mixing.state()))  # (as a checkpoint keeps it)
    again = OnlineMixture.of_run(list(mixing.prior), MixtureConfig(rule="online"), state)
    assert again.decided is not mixing.decided  # (its own: deciding again changes only it)
    assert again.decided == mixing.decided and again.decide() == mixing.decide()
    assert all(isinstance(v, list) for v in state.values())  # (plain lists: any pickle loads)


def test_an_online_schedule_grows_by_intervals_and_keeps_what_it_drew():
    config = MixtureConfig(rule="online", online_every=20)
    chunks = [n // 16 for n in SIZES.values()]
    batching = BatchingConfig(grad_accum_steps=4, micro_batch_size=16)
    decided = [[0.7, 0.2, 0.07, 0.03], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]

    def drawn(k: int):
        return build_schedule(chunks, list(SIZES.values()), config, batching, 8, 50, 0,
                              list(SIZES), decided[:k])

    one, two, three = drawn(1), drawn(2), drawn(3)
    assert (len(one), len(two), len(three)) == (20 * 8, 40 * 8, 50 * 8)  # (the last: 10 steps)
    for shorter, longer in ((one, two), (two, three)):  # what was drawn never changes
        for field in ("task", "chunk", "epoch"):
            assert np.array_equal(getattr(longer, field)[:len(shorter)], getattr(shorter, field))
    # each interval drawn by its own weights
    for k, (start, end) in enumerate(((0, 160), (160, 320), (320, 400))):
        counts = np.bincount(three.task[start:end, 0], minlength=4)
        assert np.abs(counts / (end - start) - decided[k]).max() <= 1 / (end - start)
    # each task's chunks one stream over the whole run: no chunk twice within a pass
    for task in range(4):
        mine = three.task[:, 0] == task
        for epoch in np.unique(three.epoch[mine]):
            visited = three.chunk[mine & (three.epoch[:, 0] == epoch), 0]
            assert len(set(visited)) == len(visited)
    plot = weights_plot(list(SIZES), decided, 20, 50)
    assert plot[:4] == b"\x89PNG"


def test_the_weights_plot_names_every_tasks_band_in_a_colour_of_its_own(monkeypatch):
    # 28 tasks (issue 27's 27 and a denoising task): each band a colour no other has, and a
    # legend entry naming it, top to bottom as the bands are stacked
    from muppet_ray import plots

    drawn = []
    monkeypatch.setattr(plots, "png", lambda figure: drawn.append(figure) or b"")
    names = [f"task_{i}" for i in range(28)]
    decided = [list(np.full(28, 1 / 28)), list(np.linspace(1, 2, 28) / np.linspace(1, 2, 28).sum())]
    weights_plot(names, decided, 20, 40)
    ax = drawn[0].axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names[::-1]
    bands = ax.collections
    assert len(bands) == 28 and len({tuple(b.get_facecolor()[0]) for b in bands}) == 28
    assert [tuple(h.get_facecolor()) for h in legend.legend_handles] == [
        tuple(b.get_facecolor()[0]) for b in bands[::-1]]
    plots.pyplot().close(drawn[0])  # (png, replaced here, would have closed it)


def test_online_mixing_is_refused_with_sequential_batches():
    from muppet_ray.config import ConfigError, validate

    with pytest.raises((ConfigError, ValueError), match="mixture.rule=online: not with "
                       "batching.strategy=sequential") as info:
        validate({"mixture": {"rule": "online"}, "batching": {"strategy": "sequential"}})
    assert "\n" not in str(info.value)


def test_an_online_schedule_with_unchanging_weights_draws_the_proportional_counts():
    # 27 tasks, 40 micro-batches an interval (the pre-registered setting's size): allotted
    # interval by interval, each task's count over the run stays within one of its share.
    rng = np.random.default_rng(1)
    sizes = {f"t{i}": int(n) for i, n in enumerate(rng.integers(150, 5000, 27))}
    config = MixtureConfig(rule="online", cap=2000, online_every=20)
    prior = list(mixture_weights(sizes, config).values())
    for strategy, per_unit in (("heterogeneous", 1), ("homogeneous", 2)):
        s = build_schedule([n // 16 for n in sizes.values()], list(sizes.values()), config,
                           BatchingConfig(strategy=strategy, grad_accum_steps=1), 2, 200, 0,
                           list(sizes), [prior] * 10)
        counts = np.bincount(s.task[::per_unit, 0], minlength=27)
        assert np.abs(counts - np.array(prior) * 400 / per_unit).max() <= 1, strategy
