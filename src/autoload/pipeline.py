"""A model of the loading pipeline: what every configuration should reach, from a few measured
costs, so that the search measures the promising ones instead of sweeping.

It is operational analysis in the manner of Plumber (Kuchnik et al., MLSys 2022) and of tf.data's
AUTOTUNE model: each stage of the pipeline bounds the throughput by what it costs per batch, and
the slowest bound wins.

- Without workers the main process fetches, collates and steps in turn: one batch costs
  ``fetch(bs) + step(bs)``, both measured at ``num_workers=0`` and fitted as a per-batch overhead
  plus a per-sample cost.
- With ``W`` workers, three bounds: the workers, ``W`` batches per (waiting + CPU) time of one;
  the main process, one batch per step plus its hand-off (receiving a batch from a worker); and
  the cores, which the workers' CPU time and the main process's share. A worker's CPU per batch
  is what fetching costs in-process plus a per-batch overhead of its own (collating into shared
  memory, sending), both read off the workers' CPU clocks. The bounds combine as a soft minimum,
  since a pipeline near two of them reaches neither.
- Every epoch starts with a bubble: the workers start an empty pipeline, so the step waits for a
  worker to make a whole batch while all of them share the cores, and the loader waits on a
  round trip to each worker before it hands out the first indices. With few batches an epoch
  against many workers, the bubble is a large part of it; an epoch that one round of the
  workers makes is its start and then one step per batch.

What the costs cannot tell (the cores really usable, the bubble's size, the per-worker round
trip) is fitted to the measured rates; what is left of each measured rate's error is spread to
its neighbours (a kernel smoother on the log of the rate), so predictions next to a measurement
agree with it and the model only needs to be right about trends.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from autoload.config import AmpDtype, LoaderConfig, batches_per_epoch
from autoload.timing import Costs

__all__ = ["Bound", "Observation", "PipelineModel", "Prediction"]

Bound = Literal["the training step", "fetching items", "waiting for items", "the CPU cores",
                "the hand-off from workers", "each epoch's start"]

_SOFTMIN = 4.0  # exponent of the soft minimum of the bounds
_KERNEL_SHRINK = 0.3  # a lone measurement moves its neighbours' predictions by 1 / 1.3 of its error
# Priors of the fitted parameters (log scale): cores as many as usable, the bubble as modelled,
# a millisecond's round trip per worker to start an epoch.
_PRIOR_WEIGHT = 0.2
# The axes of _features that make a configuration novel: all but the prefetch factor.
_NOVELTY_AXES = np.array([1.0, 1.0, 0.0, 1.0, 1.0])


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One measured configuration, as the model learns from it."""

    config: LoaderConfig
    rate: float
    costs: Costs | None = None
    cut_short: bool = False


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """The model's rate for a configuration, the model alone (``fitted``) and corrected by the
    measurements near it (``rate``), which bound it expects to bind, and how long each epoch's
    first batch keeps the step waiting (``start_seconds``)."""

    rate: float
    fitted: float
    bound: Bound
    start_seconds: float


class _Line:
    """Seconds per batch as ``a + b * batch_size`` (a, b >= 0), exact at the measured sizes:
    the residual ratio there is interpolated in log batch size between them."""

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        by_size: dict[int, list[float]] = {}
        for size, value in points:
            by_size.setdefault(size, []).append(max(value, 1e-9))
        self.sizes = sorted(by_size)
        self.logs = [math.log(s) for s in self.sizes]
        values = [statistics.median(by_size[s]) for s in self.sizes]
        self.a, self.b = _fit_line(self.sizes, values)
        self.ratios = [v / self._base(s) for s, v in zip(self.sizes, values, strict=True)]

    def _base(self, size: float) -> float:
        return max(self.a + self.b * size, 1e-9)

    def __call__(self, size: float) -> float:
        return self._base(size) * _interp(math.log(size), self.logs, self.ratios)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """``numpy.interp`` for one point, to the bit, without its cost per call (the planner
    predicts every configuration of the space after each trial, each from several lines)."""
    if x < xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    j = bisect.bisect_right(xs, x) - 1
    if xs[j] == x:
        return ys[j]
    return (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (x - xs[j]) + ys[j]


def _fit_line(sizes: Sequence[int], values: Sequence[float]) -> tuple[float, float]:
    """Least squares in relative error of ``a + b * size``, both at least 0; one point gives a
    cost per sample and no overhead."""
    if len(sizes) == 1:
        return 0.0, values[0] / sizes[0]
    x, y = np.asarray(sizes, float), np.asarray(values, float)
    w = 1.0 / y  # relative error
    design = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, y * w, rcond=None)
    if a < 0:
        return 0.0, float(np.sum(x * y * w * w) / np.sum(x * x * w * w))
    if b < 0:
        return float(np.sum(y * w * w) / np.sum(w * w)), 0.0
    return float(a), float(b)


@dataclass(frozen=True, kw_only=True)
class _Fitted:
    cores: float
    bubble: float  # multiplier of the modelled bubble
    round_trip: float  # seconds per worker to start an epoch


class PipelineModel:
    """Predicts the rate of any configuration from the measured ones.

    Args:
        cores: CPUs this process may use.
        samples_per_epoch: Samples an epoch serves; ``None`` for a stream (no epoch bubble).
        drop_last: Whether the last, partial batch is dropped.
        ranks: Processes of a distributed job, each with its own loader (the rates measured
            are the job's, the costs one rank's).

    Example:
        >>> model = PipelineModel(cores=2, samples_per_epoch=1024)
        >>> model.ready
        False
    """

    def __init__(self, *, cores: int, samples_per_epoch: int | None,
                 drop_last: bool = False, ranks: int = 1) -> None:
        self.cores, self.n, self.drop_last = cores, samples_per_epoch, drop_last
        self.ranks = ranks  # the job's rate is this many ranks' (the costs are one rank's)
        self.observations: list[Observation] = []
        self._fetch: _Line | None = None
        self._fetch_cpu: _Line | None = None
        self._step: _Line | None = None
        self._step_cpu: _Line | None = None
        # Autocast's factor on the step, by batch size: (sizes, factors) per dtype.
        self._amp: dict[AmpDtype, tuple[list[float], list[float]]] = {}
        # Worker CPU per batch beyond fetching in-process, and the main's per batch receiving
        # from a worker: each an overhead and a cost per byte.
        self._worker_extra = (0.0, 0.0)
        self._receive = (0.0, 0.0)
        self._bytes_per_sample = 0.0
        self._epoch_start = 0.0  # an epoch's start without workers
        self._fitted = _Fitted(cores=float(cores), bubble=1.0, round_trip=1e-3)
        self._residuals: list[tuple[np.ndarray, float]] = []
        self._residual_at = np.empty((0, len(_NOVELTY_AXES)))  # their places, one a row
        self._seen = np.empty((0, len(_NOVELTY_AXES)))  # measured places, on novelty's axes

    @property
    def ready(self) -> bool:
        """Whether the model has what it needs: costs measured without workers."""
        return self._step is not None

    # -- learning --------------------------------------------------------------------------

    def fit(self, observations: Sequence[Observation]) -> None:
        """Learn from every measured configuration (those without costs teach rates only)."""
        self.observations = [o for o in observations if o.rate > 0]
        in_process = [o for o in self.observations
                      if o.config.num_workers == 0 and o.costs is not None and not o.cut_short]
        plain = [o for o in in_process if o.config.amp is None and not o.config.pin_memory]
        if not plain:
            return
        self._fit_in_process(plain)
        self._fit_amp(in_process)
        self._fit_workers([o for o in self.observations
                           if o.config.num_workers > 0 and o.costs is not None])
        starts = [o.costs.boundary_seconds for o in plain
                  if o.costs is not None and o.costs.boundary_seconds is not None]
        self._epoch_start = max(0.0, statistics.median(starts)) if starts else 0.0
        self._fitted = self._fit_free()
        self._residuals = self._measured_errors()
        self._residual_at = np.array([f for f, _ in self._residuals]).reshape(
            len(self._residuals), len(_NOVELTY_AXES))
        # Every trial, cut short or not, makes its neighbourhood known: the search's optimism
        # about unmeasured places must not keep drawing it back to where trials were cut.
        self._seen = np.array([self._features(o.config) * _NOVELTY_AXES
                               for o in self.observations]).reshape(-1, len(_NOVELTY_AXES))

    def _measured_errors(self) -> list[tuple[np.ndarray, float]]:
        """Each whole measurement's log error against the model, for the correction. A trial
        cut short read low by construction (it was abandoned early in its window, where an
        epoch's start weighs most) and corrects nothing."""
        return [(self._features(o.config), math.log(o.rate / fitted))
                for o in self.observations
                if not o.cut_short and (fitted := self._predict_fitted(o.config)[0]) > 0]

    def _fit_in_process(self, plain: Sequence[Observation]) -> None:
        def line(get: Callable[[Costs], float]) -> _Line:
            return _Line([(o.config.batch_size, get(o.costs)) for o in plain
                          if o.costs is not None])

        self._fetch = line(lambda c: c.fetch_seconds)
        self._fetch_cpu = line(lambda c: min(c.fetch_cpu_seconds, c.fetch_seconds))
        self._step = line(lambda c: c.step_seconds)
        self._step_cpu = line(lambda c: max(c.main_cpu_seconds - c.fetch_cpu_seconds,
                                            0.2 * c.step_seconds))
        sizes = [o.costs.batch_bytes / o.config.batch_size for o in plain
                 if o.costs is not None and o.costs.batch_bytes]
        self._bytes_per_sample = statistics.median(sizes) if sizes else 0.0

    def _fit_amp(self, in_process: Sequence[Observation]) -> None:
        """Autocast's factor on the step at each batch size it was measured at, interpolated
        in log batch size between them: what lower precision saves grows with the batch here
        (memory traffic) and on GPUs (tensor cores), so one factor misjudges the far sizes."""
        assert self._step is not None
        self._amp = {}
        for amp in {o.config.amp for o in in_process if o.config.amp is not None}:
            by_size: dict[int, list[float]] = {}
            for o in in_process:
                if o.config.amp == amp and o.costs is not None:
                    by_size.setdefault(o.config.batch_size, []).append(
                        o.costs.step_seconds / self._step(o.config.batch_size))
            sizes = sorted(by_size)
            self._amp[amp] = ([math.log(s) for s in sizes],
                              [statistics.median(by_size[s]) for s in sizes])

    def _amp_factor(self, amp: AmpDtype | None, batch_size: int) -> float:
        if amp is None or amp not in self._amp:
            return 1.0
        logs, factors = self._amp[amp]
        return _interp(math.log(batch_size), logs, factors)

    def _fit_workers(self, with_workers: Sequence[Observation]) -> None:
        assert self._fetch_cpu is not None
        extra, receive = [], []
        for o in with_workers:
            assert o.costs is not None
            size = o.costs.batch_bytes
            if o.costs.worker_cpu_seconds is not None:
                extra.append((size, o.costs.worker_cpu_seconds
                              - self._fetch_cpu(o.config.batch_size)))
            receive.append((size, o.costs.fetch_cpu_seconds))
        if extra:
            self._worker_extra = _affine(extra)
        if receive:
            self._receive = _affine(receive)

    def _fit_free(self) -> _Fitted:
        """Cores, bubble and round trip that best explain the measured rates (log errors),
        held near their priors when few measurements speak to them."""
        fitting = [o for o in self.observations
                   if o.config.num_workers > 0 and not o.cut_short]
        prior = np.log([float(self.cores), 1.0, 1e-3])
        if not fitting:
            return _Fitted(cores=float(self.cores), bubble=1.0, round_trip=1e-3)
        logs = np.log([o.rate for o in fitting])

        def loss(theta: np.ndarray) -> float:
            fitted = _Fitted(cores=math.exp(theta[0]), bubble=math.exp(theta[1]),
                             round_trip=math.exp(theta[2]))
            pred = np.log([max(self._predict_fitted(o.config, fitted)[0], 1e-9)
                           for o in fitting])
            return float(np.sum((pred - logs) ** 2)
                         + _PRIOR_WEIGHT * np.sum((theta - prior) ** 2))

        theta = _nelder_mead(loss, prior, step=0.5)
        return _Fitted(cores=math.exp(theta[0]), bubble=math.exp(theta[1]),
                       round_trip=math.exp(theta[2]))

    # -- predicting ------------------------------------------------------------------------

    def predict(self, config: LoaderConfig) -> Prediction | None:
        """The predicted rate of ``config``, or ``None`` before the model is ready."""
        if not self.ready:
            return None
        fitted, bound, start = self._predict_fitted(config)
        return Prediction(rate=fitted * math.exp(self._correction(config)), fitted=fitted,
                          bound=bound, start_seconds=start)

    def _epoch_batches(self, batch_size: int) -> int | None:
        if self.n is None:
            return None
        return batches_per_epoch(self.n, batch_size, self.drop_last)

    def _predict_fitted(self, config: LoaderConfig,
                        fitted: _Fitted | None = None) -> tuple[float, Bound, float]:
        """The model's rate for ``config``, the bound it expects to bind, and how long each
        epoch's first batch keeps the step waiting (a stream's, once): without workers, the
        start measured at the epochs' boundaries."""
        assert self._fetch is not None and self._fetch_cpu is not None
        assert self._step is not None and self._step_cpu is not None
        fitted = fitted or self._fitted
        bs, w = config.batch_size, config.num_workers
        epoch = self._epoch_batches(bs)
        per_batch = bs if epoch is None or self.n is None else self.n / epoch
        amp = self._amp_factor(config.amp, bs)
        fetch = self._fetch(bs)
        fetch_cpu = min(fetch, self._fetch_cpu(bs))
        wait = fetch - fetch_cpu
        step, step_cpu = self._step(bs) * amp, self._step_cpu(bs) * amp
        if w == 0:
            seconds = fetch + step
            bound: Bound = "the training step" if step >= fetch else (
                "waiting for items" if wait > fetch_cpu else "fetching items")
            if epoch is None:
                return self.ranks * per_batch / seconds, bound, self._epoch_start
            return (self.ranks * epoch * per_batch / (epoch * seconds + self._epoch_start),
                    bound, self._epoch_start)
        return self._with_workers(bs, w, epoch, per_batch, fitted, wait=wait,
                                  fetch_cpu=fetch_cpu, step=step, step_cpu=step_cpu)

    def _with_workers(self, bs: int, w: int, epoch: int | None, per_batch: float,
                      fitted: _Fitted, *, wait: float, fetch_cpu: float, step: float,
                      step_cpu: float) -> tuple[float, Bound, float]:
        """The rate with ``w`` workers, its bound and its epochs' start. In steady state the
        slowest of three bounds sets the pace (soft minimum); each epoch adds its start: one
        worker-batch while all the epoch's workers begin at once, sharing the cores, and the
        loader's round trip to each worker.

        An epoch that one round of the workers makes (no more batches than workers) is its
        start, when every batch is made at once, and then one step per batch; on small data
        sets the best loader is often there. An epoch of more batches keeps the start on top
        of its steady pace, which errs low by up to its first round's batches: the exact form
        there draws the search into large batches with many workers, whose trials cost seconds
        of start-up (docs/search.md has the measurements)."""
        size = bs * self._bytes_per_sample
        worker_cpu = max(fetch_cpu + self._worker_extra[0] + self._worker_extra[1] * size,
                         0.5 * fetch_cpu)
        receive = max(self._receive[0] + self._receive[1] * size, 0.0)
        active = w if epoch is None else min(w, epoch)
        workers: tuple[Bound, float] = (
            "waiting for items" if wait > worker_cpu else "fetching items",
            (wait + worker_cpu) / active)
        cores: tuple[Bound, float] = ("the CPU cores",
                                      (worker_cpu + step_cpu + receive) / fitted.cores)
        main: tuple[Bound, float] = (
            "the training step" if step >= receive else "the hand-off from workers",
            step + receive)
        bounds = dict([workers, cores, main])
        seconds = sum(s ** _SOFTMIN for s in bounds.values()) ** (1 / _SOFTMIN)
        bound = max(bounds, key=bounds.__getitem__)
        start = (fitted.bubble * (wait + worker_cpu * max(1.0, active / fitted.cores))
                 + fitted.round_trip * w)
        if epoch is None:
            return self.ranks * per_batch / seconds, bound, start
        if epoch <= w:
            epoch_seconds = max(epoch * seconds, start + epoch * (step + receive))
        else:
            epoch_seconds = epoch * seconds + start
        if epoch_seconds > 1.5 * epoch * seconds:
            bound = "each epoch's start"
        return self.ranks * epoch * per_batch / epoch_seconds, bound, start

    @staticmethod
    def _features(config: LoaderConfig) -> np.ndarray:
        """Where a configuration lies, for the smoother: one unit is about one step of the
        search (a doubling of the batch size, of workers plus one, of the prefetch)."""
        return np.array([
            math.log2(config.batch_size), math.log2(1 + config.num_workers),
            0.5 * math.log2(config.prefetch_factor or 1),
            3.0 * (config.amp is not None), 3.0 * config.pin_memory,
        ])

    def novelty(self, config: LoaderConfig) -> float:
        """How far ``config`` lies from every measurement, from 1 (nothing near) towards 0
        (measured around it): ``1 / (1 + the kernel's weights)``.

        The prefetch factor does not count: the model predicts every prefetch factor alike,
        so an unmeasured one is no reason for hope, and counting it sent the search to the
        largest prefetch with the most workers first, where batches of megabytes in flight
        slowed the step most (on 76 KB items, 400 a batch with 7 workers and a prefetch of 8
        read 4.1k/s against 8.4k/s for 504 a batch with 4 workers and a prefetch of 2)."""
        x = self._features(config) * _NOVELTY_AXES
        return 1.0 / (1.0 + sum(math.exp(-0.5 * float(d)) for d in _squared_distances(
            x, self._seen)))

    def _correction(self, config: LoaderConfig) -> float:
        if not self._residuals:
            return 0.0
        x = self._features(config)
        weights = [math.exp(-0.5 * float(d))
                   for d in _squared_distances(x, self._residual_at)]
        total = sum(weights)
        return sum(w * r for w, (_, r) in zip(weights, self._residuals, strict=True)) / (
            total + _KERNEL_SHRINK)


def _squared_distances(x: np.ndarray, places: np.ndarray) -> np.ndarray:
    """The squared distance of ``x`` to each row of ``places``: one reduction for all rows
    (the kernels weigh every measurement for every configuration the planner predicts)."""
    distances: np.ndarray = np.sum((x - places) ** 2, axis=1)
    return distances


def _affine(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``a + b * x`` through the points (b >= 0); the median alone for one size."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return statistics.median(y for _, y in points), 0.0
    x, y = np.asarray(xs, float), np.asarray([v for _, v in points], float)
    b, a = np.polyfit(x, y, 1)
    if b < 0:
        return float(np.median(y)), 0.0
    return float(a), float(b)


def _nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, *, step: float,
                 iterations: int = 120) -> np.ndarray:
    """A small Nelder-Mead minimiser (a few parameters, a smooth loss)."""
    n = len(x0)
    simplex = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best + 0.5 * (x - best) for x in simplex]
                values = [f(x) for x in simplex]
    winner: np.ndarray = np.asarray(simplex[int(np.argmin(values))])
    return winner
