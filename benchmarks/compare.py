"""The side-by-side re-measure of the tuner's pick, the oracle and the two baselines, and the
verdict on each case and on the random workloads as a whole."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from common import log
from oracle import measure, window
from settings import Settings

from autoload import LoaderConfig, Probe
from autoload.final import interleaved

ROLES = ("tuner", "oracle", "defaults", "recipe")
FIXED_TARGET = 0.95  # a fixed case: the tuner's median is at least this share of the oracle's
RANDOM_TARGET, RANDOM_MEDIAN_TARGET = 0.90, 0.97  # each random workload, and their median
# The tuner keeps to its budget: its wall time at most this share of it, plus a second.
TIME_SLACK = 1.05


def remeasure(name: str, probe: Probe, roles: dict[str, LoaderConfig], settings: Settings,
              target: float) -> list[dict[str, Any]]:
    """Measure each distinct config of ``roles`` once per round, in the library's interleaved
    order; then extra rounds of the pick and the oracle while ``target`` lies within their
    noise."""
    configs = list(dict.fromkeys(roles.values()))
    limits = window(settings.final_window, settings)
    rows: list[dict[str, Any]] = []
    total = settings.rounds * len(configs)
    for r in range(settings.rounds + settings.extra_rounds):
        if r >= settings.rounds:  # an extra round, for the oracle target alone
            if not oracle_undecided(roles, rows, target):
                break
            configs = [roles["tuner"], roles["oracle"]]
            total += len(configs)
        for config in interleaved(configs, r):
            row = measure(probe, config, limits)
            row["round"] = r
            rows.append(row)
            outcome = row["error"] or f"{row['samples_per_second']:,.0f}/s"
            log(f"[{name}] re-measure {len(rows)}/{total} {config.label()}: {outcome}"
                + (" (extra round: tuner/oracle within noise of the target)"
                   if r >= settings.rounds else ""))
    return rows


def rates_by_config(rows: list[dict[str, Any]]) -> dict[LoaderConfig, list[float]]:
    """The re-measured rates of each configuration, in the order measured."""
    rates: dict[LoaderConfig, list[float]] = {}
    for row in rows:
        rates.setdefault(LoaderConfig.from_dict(row["config"]), []).append(
            row["samples_per_second"])
    return rates


def oracle_undecided(roles: dict[str, LoaderConfig], rows: list[dict[str, Any]],
                     target: float = FIXED_TARGET) -> bool:
    """Whether the tuner/oracle target lies within the noise of the ratio measured so far:
    the ratio of medians, give or take the larger relative half-range of the two."""
    tuner, oracle = roles.get("tuner"), roles.get("oracle")
    if tuner is None or oracle is None or tuner == oracle:
        return False
    rates = rates_by_config(rows)
    mine, best = spread(rates.get(tuner, [])), spread(rates.get(oracle, []))
    if mine["median"] <= 0 or best["median"] <= 0:
        return False
    ratio = mine["median"] / best["median"]
    noise = max(mine["half_range"], best["half_range"])
    return ratio * (1 - noise) < target < ratio * (1 + noise)


def spread(rates: Sequence[float]) -> dict[str, float]:
    """min, median, max and the relative half-range ``(max - min) / 2 / median``."""
    if not rates:
        return {"min": 0.0, "median": 0.0, "max": 0.0, "half_range": 0.0}
    med = float(statistics.median(rates))
    lo, hi = float(min(rates)), float(max(rates))
    return {"min": lo, "median": med, "max": hi,
            "half_range": (hi - lo) / 2 / med if med > 0 else 0.0}


def not_below(mine: dict[str, float], other: dict[str, float]) -> tuple[bool, float]:
    """Whether ``mine`` is not below ``other`` beyond the noise, and that noise: the larger
    relative half-range of the two."""
    noise = max(mine["half_range"], other["half_range"])
    return mine["median"] >= other["median"] * (1 - noise), noise


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def evaluate(roles: dict[str, LoaderConfig], rows: list[dict[str, Any]], tune_wall: float,
             grid_wall: float, *, budget: float, target: float) -> dict[str, Any]:
    """Medians, ratios and the four targets of one case."""
    rates = rates_by_config(rows)
    spreads = {role: spread(rates.get(config, [])) for role, config in roles.items()}
    zero = spread([])
    tuner, oracle = spreads.get("tuner", zero), spreads.get("oracle", zero)
    defaults, recipe = spreads["defaults"], spreads["recipe"]
    ok_defaults, noise_defaults = not_below(tuner, defaults)
    ok_recipe, noise_recipe = not_below(tuner, recipe)
    time_limit = TIME_SLACK * budget + 1.0
    over = ratio(tuner["median"], oracle["median"])
    targets = {
        "oracle": over is not None and over >= target,
        "defaults": "tuner" in roles and ok_defaults,
        "recipe": "tuner" in roles and ok_recipe,
        "time": "tuner" in roles and tune_wall <= time_limit,
    }
    failed = [k for k, v in targets.items() if not v]
    return {
        "spreads": spreads, "tuner_over_oracle": over, "oracle_target": target,
        "speedup_vs_defaults": ratio(tuner["median"], defaults["median"]),
        "speedup_vs_recipe": ratio(tuner["median"], recipe["median"]),
        "noise_vs_defaults": noise_defaults, "noise_vs_recipe": noise_recipe,
        "tune_seconds": tune_wall, "grid_seconds": grid_wall,
        "tune_over_grid": ratio(tune_wall, grid_wall), "time_limit_seconds": time_limit,
        "targets": targets,
        "verdict": "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")",
    }


def distribution(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The random workloads' tuner/oracle ratios, and whether they meet the targets: a median
    of at least 0.97 and none under 0.90, none below a baseline beyond the noise."""
    drawn = [c for c in results.values() if c.get("spec")]
    ratios = sorted(c["summary"]["tuner_over_oracle"] or 0.0 for c in drawn)
    if not ratios:
        return None
    baselines = all(c["summary"]["targets"]["defaults"] and c["summary"]["targets"]["recipe"]
                    for c in drawn)
    median = statistics.median(ratios)
    ok = median >= RANDOM_MEDIAN_TARGET and ratios[0] >= RANDOM_TARGET and baselines
    return {"count": len(ratios), "ratios": ratios, "median": median, "min": ratios[0],
            "max": ratios[-1], "baselines_held": baselines,
            "verdict": "PASS" if ok else "FAIL"}
