"""What to measure next: a planner that predicts every configuration with the pipeline model and
measures the promising ones, and an Optuna sampler that asks it.

The plan, trial by trial:

1. Calibrate without workers (no start-up to pay): batch sizes 4x either side of the defaults',
   going on by 4x in the direction that wins until the best is bracketed, then 2x either side
   of the best (a rate can fall off a cliff between sizes 4x apart). These windows give
   the model its per-item fetch cost (CPU and waiting) and the step's cost at several batch
   sizes; the recipe, measured as a baseline, gives the workers' costs.
2. Then, alternately, the configuration the model predicts fastest of all that are not measured
   yet, and the one it predicts fastest among the neighbours of the best measured so far (one
   step in batch size, workers and prefetch, together): the first follows the model where it
   is right, the second climbs from what was measured where it is not (and where the model
   sees no neighbour worth it, to twice and half the best's batch size all the same). Every
   measurement refits the model.
3. Once the model has spoken twice, autocast and ``pin_memory`` are tried on the best so far:
   what they do to the step is not in the costs until measured.

Configurations in a region that faulted are not proposed: a memory cap crossed by a
configuration rules out those with at least its batch size, workers and prefetch; workers that
keep dying (twice, with none alive) rule out workers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from autoload.config import LoaderConfig, batches_per_epoch
from autoload.pipeline import Observation, PipelineModel, Prediction
from autoload.search import SearchState

__all__ = ["PlannedSampler", "Planner", "Proposal"]

_BATCH_STEP = 4  # the calibration sweep steps by this factor
_FINEST = 2.5  # and halves a step to the best's side while it spans more than this factor
_PICKS_BEFORE_OPTIONS = 2
# The search has found what it can once, after this many of the model's picks, nothing open
# is predicted within these shares of the best measured rate: anywhere (the model's trends
# err by a fifth or so far from what it measured), or next to the best (where it is accurate).
_MIN_PICKS, _HOPE_ANYWHERE, _HOPE_NEARBY = 8, 0.85, 0.97
# Far from every measurement the model's error is larger: a pick anywhere weighs a prediction
# up by this share of its novelty (optimism in the face of uncertainty), and a step next to
# the best is taken only while the model gives it this share of the best's rate.
_OPTIMISM, _WORTH_A_STEP = 0.3, 0.9
# A configuration whose epochs start (the step waiting for the first batch) longer than this
# many search windows is not proposed: see Planner._best_predicted.
_START_WINDOWS = 2.0


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """The planner's answer: the configuration to measure next and the rate the model predicts
    for it; or none (``config`` is ``None``), and whether that is because nothing is left
    worth measuring (``exhausted``) rather than because the model cannot tell yet."""

    config: LoaderConfig | None
    predicted: float | None = None
    exhausted: bool = False


class Planner:
    """Proposes the next configuration to measure; ``None`` when nothing is worth it (or, for a
    probe that reports no costs, when the model cannot help: then Optuna's own sampler
    decides)."""

    def __init__(self, state: SearchState, model: PipelineModel) -> None:
        self.state, self.model = state, model
        self.picks = 0

    def next(self) -> Proposal:
        self.refit()
        for stage in (self._batch_sweep, self._options, self._pick):
            config = stage()
            if config is not None:
                prediction = self.model.predict(config)
                return Proposal(config=config,
                                predicted=None if prediction is None else prediction.rate)
        return Proposal(config=None, exhausted=self.model.ready)

    def refit(self) -> None:
        self.model.fit([Observation(config=r.config, rate=r.samples_per_second, costs=r.costs,
                                    cut_short=r.cut_short)
                        for r in self.state.ok()])

    # -- stages ----------------------------------------------------------------------------

    def _batch_sweep(self) -> LoaderConfig | None:
        """Batch sizes 4x either side of the defaults', then on by 4x in the direction that won
        until the best is bracketed (a big batch costs a long step, so only go there when the
        trend says so), then halfway to each side of the best."""
        if not self.state.baselines:
            return None
        space, ref = self.state.space, self.state.baselines[0]
        if ref.num_workers != 0:
            return None
        rates = {r.config.batch_size: r.samples_per_second for r in self.state.ok()
                 if r.config == dataclasses.replace(ref, batch_size=r.config.batch_size)}
        if ref.batch_size not in rates:
            return None
        tried = sorted(rates)
        best = max(tried, key=rates.__getitem__)
        below, above = ref.batch_size / _BATCH_STEP, ref.batch_size * _BATCH_STEP
        if tried[0] >= ref.batch_size or tried[-1] <= ref.batch_size:
            targets = [below, above]  # both sides of the defaults first
        elif best == tried[-1]:
            targets = [best * _BATCH_STEP]
        elif best == tried[0]:
            targets = [best / _BATCH_STEP]
        else:
            targets = []  # bracketed
        for target in [*targets, *_halfway(tried, rates, best)]:
            config = dataclasses.replace(ref, batch_size=_nearest(space.batch_sizes, target))
            if self._open(config):
                return config
        return None

    def _options(self) -> LoaderConfig | None:
        """Autocast and pin_memory toggled on the best so far, each value once."""
        best = self.state.best()
        if best is None or (self.model.ready and self.picks < _PICKS_BEFORE_OPTIONS):
            return None
        space, config = self.state.space, best.config
        tried = {(r.config.amp, r.config.pin_memory) for r in self.state.measured.values()}
        for amp in space.amp:
            if all(a != amp for a, _ in tried):
                candidate = dataclasses.replace(config, amp=amp)
                if self._open(candidate):
                    return candidate
        for pin in space.pin_memory:
            if all(p != pin for _, p in tried):
                candidate = dataclasses.replace(config, pin_memory=pin)
                if self._open(candidate):
                    return candidate
        return None

    def _pick(self) -> LoaderConfig | None:
        if not self.model.ready:
            return None
        best = self.state.best()
        anywhere = self._best_predicted(self.state.space.configs(), optimism=_OPTIMISM)
        nearby = None if best is None else self._best_predicted(self._neighbours(best.config))
        climb = None if best is None else self._best_predicted(self._doubled(best.config))
        if best is not None and climb is None and self.picks >= _MIN_PICKS and self._hopeless(
                anywhere, nearby, best.samples_per_second):
            return None
        step_worth = (nearby is not None and best is not None
                      and nearby[0] >= _WORTH_A_STEP * best.samples_per_second)
        choice = anywhere
        if self.picks % 2 == 1:
            choice = nearby if step_worth else climb or anywhere
        if choice is not None:
            self.picks += 1
            return choice[1]
        return None

    @staticmethod
    def _hopeless(anywhere: tuple[float, LoaderConfig] | None,
                  nearby: tuple[float, LoaderConfig] | None, best: float) -> bool:
        return ((anywhere is None or anywhere[0] < _HOPE_ANYWHERE * best)
                and (nearby is None or nearby[0] < _HOPE_NEARBY * best))

    # -- helpers ---------------------------------------------------------------------------

    def _best_predicted(self, pool: Iterable[LoaderConfig], *, optimism: float = 0.0,
                        ) -> tuple[float, LoaderConfig] | None:
        """The open configuration of ``pool`` the model predicts fastest, and its score (the
        prediction, raised by ``optimism`` times its novelty).

        Not one whose epochs are predicted to start later than ``_START_WINDOWS`` search
        windows, unless at the smallest batch size (for items so slow that every batch starts
        late): its trial would cost as much as several others (on 5,100 items of 3 ms each,
        1,020 items a batch with 8 workers took 24 s of a 60 s budget) and see little but the
        start, and smaller batches with the same workers keep the same pace."""
        scored: list[tuple[float, LoaderConfig]] = []
        over = self._over_cap()
        longest_start = _START_WINDOWS * self.state.window.seconds
        smallest = self.state.space.batch_sizes[0]
        for config in pool:
            if not self._open(config):
                continue
            prediction: Prediction | None = self.model.predict(config)
            if prediction is not None and (prediction.start_seconds <= longest_start
                                           or config.batch_size == smallest):
                # Most of a worker's memory is its own process, whatever it prefetches: at
                # least the batch size and workers of a configuration over the cap is a risk,
                # measured only once nothing else looks as good.
                risky = any(_dominates(config, c, prefetch=False) for c in over)
                hope = 1.0 + optimism * self.model.novelty(config) if optimism else 1.0
                scored.append((prediction.rate * hope * (0.5 if risky else 1.0), config))
        if not scored:
            return None
        # Ties (the model does not tell prefetch factors apart) go to the simpler setting.
        return max(scored, key=lambda s: (s[0], [-x for x in _complexity(s[1])]))

    def _neighbours(self, config: LoaderConfig) -> list[LoaderConfig]:
        """One step in batch size (x or / by about 1.4 and 2), workers and prefetch factor,
        alone or together."""
        space = self.state.space
        sizes = {config.batch_size, *(_nearest(space.batch_sizes, config.batch_size * f)
                                      for f in (0.5, 2 ** -0.5, 2 ** 0.5, 2.0))}
        workers = _adjacent(space.worker_counts, config.num_workers)
        found = []
        for bs in sizes:
            for w in workers:
                prefetches: Sequence[int | None] = [None]
                if w > 0:
                    base = config.prefetch_factor or 2
                    prefetches = _adjacent(space.prefetch_factors,
                                           min(space.prefetch_factors,
                                               key=lambda p: abs(math.log(p / base))))
                for pf in prefetches:
                    found.append(dataclasses.replace(config, batch_size=bs, num_workers=w,
                                                     prefetch_factor=pf))
        return [c for c in found if c != config]

    def _doubled(self, config: LoaderConfig) -> list[LoaderConfig]:
        """Twice and half the batch size, the rest kept: the climb the model is not asked
        about. Where the model errs (it learned the step without workers, and a step can cost
        several times more or less beside them), the best measured point's neighbours in the
        strongest lever are measured all the same, so that the answer is at least a local
        best in batch size. Not towards a configuration over the memory cap, though."""
        sizes, over = self.state.space.batch_sizes, self._over_cap()
        doubled = [dataclasses.replace(config, batch_size=_nearest(sizes, config.batch_size * f))
                   for f in (2.0, 0.5)]
        return [c for c in doubled if not any(_dominates(c, o, prefetch=False) for o in over)]

    def _over_cap(self) -> list[LoaderConfig]:
        return [r.config for r in self.state.measured.values() if r.state == "infeasible"]

    def _same_loader(self, a: LoaderConfig, b: LoaderConfig) -> bool:
        """Whether ``a`` and ``b`` differ in prefetch alone, where both already request every
        batch of an epoch at its start (``num_workers x prefetch_factor`` at least the epoch's
        batches): the loader then runs the same either way, and a second window would measure
        only noise (on a data set of 900 items, three of a search's 23 trials measured again,
        at another prefetch, a loader it had measured)."""
        n, w = self.state.space.samples_per_epoch, a.num_workers
        if (n is None or w == 0 or b.num_workers != w
                or dataclasses.replace(a, prefetch_factor=b.prefetch_factor) != b):
            return False
        epoch = batches_per_epoch(n, a.batch_size, a.drop_last)
        return min(a.prefetch_factor or 0, b.prefetch_factor or 0) * w >= epoch

    def _open(self, config: LoaderConfig) -> bool:
        """Not measured yet, in the space, and outside every region that faulted."""
        state = self.state
        if config in state.measured or not state.space.contains(config):
            return False
        if any(self._same_loader(config, measured) for measured in state.measured):
            return False
        for record in state.measured.values():
            if record.state == "infeasible" and _dominates(config, record.config):
                return False
        if config.num_workers > 0:
            with_workers = [r for r in state.measured.values() if r.config.num_workers > 0]
            dead = [r for r in with_workers if r.state == "failed"]
            if len(dead) >= 2 and len(dead) == len(with_workers):
                return False
        return True


def _dominates(config: LoaderConfig, faulted: LoaderConfig, *, prefetch: bool = True) -> bool:
    """Whether ``config`` needs at least the memory of ``faulted`` (same precision and pinning,
    no smaller batch, no fewer workers, and with ``prefetch`` no fewer batches in flight)."""
    return (config.amp == faulted.amp and config.pin_memory == faulted.pin_memory
            and config.batch_size >= faulted.batch_size
            and config.num_workers >= faulted.num_workers
            and (not prefetch
                 or (config.prefetch_factor or 0) >= (faulted.prefetch_factor or 0)))


def _complexity(config: LoaderConfig) -> tuple[int, int]:
    return abs((config.prefetch_factor or 2) - 2), config.num_workers


def _halfway(tried: Sequence[int], rates: dict[int, float], best: int) -> list[float]:
    """The batch sizes halfway (in log) from ``best`` to each tried neighbour more than 2x away,
    the faster neighbour's side first. A rate is not smooth in batch size: it can fall off a
    cliff between two sizes 4x apart (the batch outgrowing a cache), and the peak then sits just
    before the cliff, where no interpolation of the two would put it."""
    i = tried.index(best)
    sides = [tried[j] for j in (i - 1, i + 1)
             if 0 <= j < len(tried) and max(tried[j], best) / min(tried[j], best) > _FINEST]
    return [math.sqrt(best * s) for s in sorted(sides, key=rates.__getitem__, reverse=True)]


def _nearest(sizes: Sequence[int], target: float) -> int:
    return min(sizes, key=lambda b: abs(math.log(b / target)))


def _adjacent(values: Sequence[int], value: int) -> list[int]:
    i = values.index(value) if value in values else min(
        range(len(values)), key=lambda k: abs(values[k] - value))
    return list(values[max(0, i - 1): i + 2])


class PlannedSampler(BaseSampler):
    """An Optuna sampler whose trials are the planner's proposals.

    Enqueued trials (the baselines) keep their fixed parameters; every other trial asks the
    planner once for a whole configuration and answers each ``suggest_*`` from it. When the
    planner has no proposal, ``fallback`` (TPE) samples instead.
    """

    def __init__(self, planner: Planner, fallback: BaseSampler) -> None:
        self.planner, self.fallback = planner, fallback
        self._plans: dict[int, dict[str, Any]] = {}

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if trial.number not in self._plans:
            proposal, state = self.planner.next(), self.planner.state
            state.planned(proposal.config, predicted=proposal.predicted,
                          exhausted=proposal.exhausted)
            self._plans[trial.number] = ({} if proposal.config is None
                                         else state.space.params(proposal.config))
        plan = self._plans[trial.number]
        if param_name in plan:
            return plan[param_name]
        return self.fallback.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.fallback.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        self._plans.pop(trial.number, None)
        self.fallback.after_trial(study, trial, state, values)
