"""Mixture weights and the schedule: which chunks of which tasks form each micro-batch, in order.

The schedule is a pure function of the task sizes, the mixture, the batching strategy and the
seed, so every worker computes the same one, and a restarted worker knows exactly where to
continue. Optimizer step s consumes positions [s*N, (s+1)*N), N micro-batches per step; with W
workers, position p goes to worker p % W. N does not depend on W, so an elastic run that restarts
with another worker count trains on exactly the same micro-batches, in the same steps.

Tasks are interleaved by stride scheduling: unit i of task t sits at (i + phase_t) / count_t on a
common clock. Over any window every task then holds its target share to within about one unit,
far tighter than random sampling; the random phases keep tasks from moving in lockstep.

The mixture weights are shares of examples. Chunks of a fixed size hold as many examples each,
so the units are allotted by the weights themselves; with a token budget
(`batching.tokens_per_micro_batch`) a short-example task's chunks hold more, so task t gets
units in proportion to w_t / (examples_t / chunks_t), and its examples drawn follow w_t.

With mixture.rule=online the weights change during the run (OnlineMixture: online data mixing,
an exponentiated-gradient update from each task's training loss). The schedule is then built
interval by interval from the weights decided so far, which every checkpoint keeps: a resumed
run draws exactly the micro-batches that those weights give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from muppet_ray.config import BatchingConfig, MixtureConfig


def mixture_weights(sizes: dict[str, int], config: MixtureConfig) -> dict[str, float]:
    """Normalised sampling weight per task (examples-proportional by default, as in Muppet)."""
    capped = {t: float(min(n, config.cap) if config.cap else n) for t, n in sizes.items()}
    if config.rule in ("proportional", "online"):  # (online starts from proportional)
        raw = capped
    elif config.rule == "temperature":
        raw = {t: n ** (1.0 / config.temperature) for t, n in capped.items()}
    elif config.rule == "uniform":
        raw = {t: 1.0 for t in sizes}
    else:
        raw = {t: float(config.weights[t]) for t in sizes}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("mixture weights sum to zero")
    return {t: w / total for t, w in raw.items()}


def allocate(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to weights (largest remainder)."""
    exact = {t: w * total for t, w in weights.items()}
    counts = {t: int(np.floor(x)) for t, x in exact.items()}
    by_remainder = sorted(exact, key=lambda t: (-(exact[t] - counts[t]), t))
    for t in by_remainder[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


def _per_chunk(weights: dict[str, float], chunks_per_task: list[int],
               examples_per_task: list[int], names: list[str]) -> dict[str, float]:
    """The share of the chunks each task needs for its share of the examples to be its weight,
    where its chunks hold examples_t / chunks_t examples on average (a token budget: a short
    task's chunks hold more)."""
    raw = {n: weights[n] * chunks / examples
           for n, chunks, examples in zip(names, chunks_per_task, examples_per_task)}
    total = sum(raw.values())
    return {n: w / total for n, w in raw.items()}


def examples_per_micro_batch(chunks_per_task: list[int], examples_per_task: list[int],
                             mixture: MixtureConfig, batching: BatchingConfig,
                             names: list[str] | None = None) -> float:
    """A micro-batch's examples on average over the schedule: micro_batch_size, or with a token
    budget 1 / sum_t(w_t / (examples_t / chunks_t)) (each task's chunks drawn as build_schedule
    draws them)."""
    if not batching.tokens_per_micro_batch:
        return float(batching.micro_batch_size)
    names = names or [str(i) for i in range(len(chunks_per_task))]
    weights = mixture_weights(dict(zip(names, examples_per_task)), mixture)
    return 1 / sum(weights[n] * chunks / examples
                   for n, chunks, examples in zip(names, chunks_per_task, examples_per_task))


@dataclass(frozen=True)
class Schedule:
    """The run's micro-batches in order: micro-batch p holds chunks (task[p, j], chunk[p, j])."""

    task: np.ndarray  # [M, k] task index
    chunk: np.ndarray  # [M, k] chunk index within the task's cache
    epoch: np.ndarray  # [M, k] pass over the task's data that the chunk belongs to
    per_step: int  # micro-batches per optimizer step

    def __len__(self) -> int:
        return len(self.task)

    def step_positions(self, step: int) -> range:
        return range(step * self.per_step, (step + 1) * self.per_step)

    def worker_positions(self, rank: int, world_size: int, start_step: int = 0,
                         cost: np.ndarray | None = None) -> np.ndarray:
        """The positions worker `rank` of `world_size` trains on from `start_step` on: per step
        `per_step / world_size` of the step's positions, steps in order.

        Workers wait for each other at every step, and single-task micro-batches differ in
        size (a multiple-choice micro-batch holds several rows per example), so with `cost`
        (an estimate per position, e.g. its padded tokens) each step's micro-batches are dealt
        out largest first in snake order (workers 0..W-1, then W-1..0, ...), which evens out
        the workers' shares. Without it, position p goes to worker p % W. Either way a step
        trains on exactly its positions, whatever the number of workers."""
        steps = len(self) // self.per_step
        slots = np.arange(steps * self.per_step).reshape(steps, self.per_step)
        if cost is None:
            owner = slots % world_size
        else:
            turn = np.arange(self.per_step)
            snake = np.where(turn // world_size % 2 == 0, turn % world_size,
                             world_size - 1 - turn % world_size)
            largest_first = np.argsort(-np.asarray(cost).reshape(steps, self.per_step), axis=1,
                                       kind="stable")
            owner = np.empty_like(slots)
            np.put_along_axis(owner, largest_first, np.broadcast_to(snake, slots.shape), axis=1)
        return slots[start_step:][owner[start_step:] == rank]


def _task_chunks(num_chunks: int, count: int, rng: np.random.Generator):
    """`count` chunk indices of one task: whole passes over its chunks, each freshly permuted."""
    passes = -(-count // num_chunks)
    order = np.concatenate([rng.permutation(num_chunks) for _ in range(passes)])[:count]
    epoch = np.repeat(np.arange(passes), num_chunks)[:count]
    return order, epoch


def build_schedule(
    chunks_per_task: list[int],
    examples_per_task: list[int],
    mixture: MixtureConfig,
    batching: BatchingConfig,
    per_step: int,
    max_steps: int,
    seed: int,
    names: list[str] | None = None,
    decided: list[list[float]] | None = None,
) -> Schedule:
    """The run's schedule; with mixture.rule=online, that of the intervals whose weights are
    `decided` (OnlineMixture.decided, one list per interval in task order), which it extends as
    more are decided: a task's chunks are drawn from one stream over the whole run, so the
    micro-batches already scheduled never change."""
    names = names or [str(i) for i in range(len(chunks_per_task))]
    if mixture.rule == "online":
        if not decided:
            raise ValueError("mixture.rule=online: the schedule follows the weights decided "
                             "during the run (its \"mixture\" records), and none were given")
        every = mixture.online_every
        intervals = [(dict(zip(names, w)), min(every, max_steps - k * every))
                     for k, w in enumerate(decided)]
    else:
        intervals = [(mixture_weights(dict(zip(names, examples_per_task)), mixture), max_steps)]
    strategy = batching.strategy
    # The unit the mixture interleaves: a chunk, or for homogeneous updates a whole step's worth
    # of one task; `mixed` micro-batches are made of several consecutive chunks.
    per_unit = per_step if strategy == "homogeneous" else 1
    per_micro_batch = batching.tasks_per_micro_batch if strategy == "mixed" else 1
    unit_task = []
    target, given = np.zeros(len(names)), np.zeros(len(names))
    for k, (weights, steps) in enumerate(intervals):
        if batching.tokens_per_micro_batch:
            weights = _per_chunk(weights, chunks_per_task, examples_per_task, names)
        units = steps * per_step * per_micro_batch // per_unit
        share = np.array([weights[n] for n in names])
        counts = (np.array([allocate(weights, units)[n] for n in names]) if k == 0
                  else _owed_counts(names, target + units * share - given, units))
        target += units * share
        given += counts
        rng = np.random.default_rng([seed, 0x5EED] if k == 0 else [seed, 0x5EED, k])
        unit_task.append(_interleave(counts, strategy, rng))
    slot_task = np.repeat(np.concatenate(unit_task), per_unit)

    slot_chunk = np.empty_like(slot_task)
    slot_epoch = np.empty_like(slot_task)
    for t, num_chunks in enumerate(chunks_per_task):
        where = np.flatnonzero(slot_task == t)
        if len(where):
            task_rng = np.random.default_rng([seed, t])
            slot_chunk[where], slot_epoch[where] = _task_chunks(num_chunks, len(where), task_rng)
    shape = (len(slot_task) // per_micro_batch, per_micro_batch)
    return Schedule(slot_task.reshape(shape), slot_chunk.reshape(shape),
                    slot_epoch.reshape(shape), per_step)


def _owed_counts(names: list[str], owed: np.ndarray, units: int) -> np.ndarray:
    """An interval after the first (an online mixture's: few units each) is allotted by what
    each task is owed so far, so that the rounding evens out over the run instead of shorting
    the same small tasks every interval."""
    owed = np.maximum(owed, 0)
    return np.array([allocate(dict(zip(names, owed / owed.sum())), units)[n] for n in names])


def _interleave(counts: np.ndarray, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """The order of `counts[t]` units of each task t: tasks one after another (sequential), or
    interleaved by stride scheduling (see the module's docstring)."""
    if strategy == "sequential":
        return np.repeat(np.arange(len(counts)), counts)
    phase = rng.random(len(counts))
    unit_task = np.concatenate([np.full(c, t) for t, c in enumerate(counts)]).astype(int)
    clock = np.concatenate([(np.arange(c) + phase[t]) / c for t, c in enumerate(counts)])
    return unit_task[np.lexsort((unit_task, clock))]


@dataclass
class OnlineMixture:
    """mixture.rule=online: the task weights move, every `every` steps, towards the tasks whose
    training loss is highest (online data mixing, Albalak et al. 2023: tasks still far from
    learnt get more of the updates). The loss is each task's mean over the interval of its
    examples' losses divided by log(n), so that tasks with large output spaces compare; a
    task's log-weight grows by `rate` times it (an exponentiated-gradient step), and the weights
    drawn are (1 - floor) x those + floor x the proportional ones, so that no task is starved.

    Every worker holds the same one, updated from the losses summed over all workers, so all
    decide alike. Its state goes into every checkpoint (`state`): a run resumed at the same
    worker count makes the decisions the uninterrupted run makes (its losses are the same, bit
    for bit: train.py seeds each step); one resumed at another count keeps every decision taken
    up to its checkpoint, and makes the later ones from its own losses."""

    prior: np.ndarray  # [T] proportional weights
    every: int
    rate: float
    floor: float
    scores: np.ndarray = None  # [T] rate x summed interval losses: the log-weights' change
    decided: list[list[float]] = field(default_factory=list)  # each interval's weights
    loss: np.ndarray = None  # [T] this interval's summed scaled losses so far
    examples: np.ndarray = None  # [T] and its examples

    def __post_init__(self):
        size = len(self.prior)
        self.scores = np.zeros(size) if self.scores is None else np.asarray(self.scores)
        self.loss = np.zeros(size) if self.loss is None else np.asarray(self.loss)
        self.examples = np.zeros(size) if self.examples is None else np.asarray(self.examples)
        if not self.decided:
            self.decided = [self.weights().tolist()]

    @classmethod
    def of_run(cls, prior: list[float], config: MixtureConfig, state: dict | None = None
               ) -> OnlineMixture:
        """A run's mixture: a fresh one, or the one its checkpoint kept (`state`)."""
        return cls(np.asarray(prior, dtype=np.float64), config.online_every, config.online_rate,
                   config.online_floor, **(state or {}))

    def state(self) -> dict:
        return {"scores": self.scores.tolist(), "decided": self.decided,
                "loss": self.loss.tolist(), "examples": self.examples.tolist()}

    def weights(self) -> np.ndarray:
        adapted = self.prior * np.exp(self.scores - self.scores.max())
        return (1 - self.floor) * adapted / adapted.sum() + self.floor * self.prior

    def add(self, task_scaled_loss: np.ndarray, task_examples: np.ndarray) -> None:
        """A step's per-task sums of scaled losses and examples (over all workers)."""
        self.loss += task_scaled_loss
        self.examples += task_examples

    def due(self, step: int, max_steps: int) -> bool:
        """Whether the interval that starts after `step` steps needs its weights now."""
        return step % self.every == 0 and step < max_steps

    def decide(self) -> list[float]:
        """The next interval's weights, from this one's mean losses; a task that drew no
        examples in it moves as the mean of those that did (neither up nor down)."""
        seen = self.examples > 0
        mean = np.divide(self.loss, self.examples, out=np.zeros_like(self.loss), where=seen)
        if seen.any():
            self.scores = self.scores + self.rate * np.where(seen, mean, mean[seen].mean())
        self.loss, self.examples = np.zeros_like(self.loss), np.zeros_like(self.examples)
        self.decided.append(self.weights().tolist())
        return self.decided[-1]


def weights_plot(names: list[str], decided: list[list[float]], every: int, max_steps: int
                 ) -> bytes:
    """The decided weights over the run's steps (PNG): a band per task, stacked, each in a
    colour of its own (up to 60 tasks; matplotlib's default cycle repeats after 10) and named
    in the legend, top to bottom as the bands are stacked."""
    from matplotlib import colormaps

    from muppet_ray.plots import png, pyplot

    steps = [k * every for k in range(len(decided))] + [max_steps]
    shares = np.asarray(decided + decided[-1:]).T  # (the last interval drawn to its end)
    palette = [c for m in ("tab20", "tab20b", "tab20c") for c in colormaps[m].colors]
    columns = 1 + (len(names) - 1) // 30
    figure, ax = pyplot().subplots(figsize=(8, max(4.5, 0.8 + 0.2 * len(names) / columns)))
    ax.stackplot(steps, shares, labels=names, step="post",
                 colors=[palette[i % len(palette)] for i in range(len(names))])
    ax.set(xlabel="step", ylabel="share of the examples drawn", xlim=(0, steps[-1]), ylim=(0, 1),
           title="Online mixture: task weights")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1, 0.5),
              fontsize=8 if len(names) <= 12 else 7, ncol=columns)
    return png(figure)
