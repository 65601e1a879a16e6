"""The benchmark's printed tables (rich): results per case, re-measured spreads, and the
distribution over the random workloads."""

from __future__ import annotations

from typing import Any

from compare import FIXED_TARGET, RANDOM_MEDIAN_TARGET, RANDOM_TARGET, ROLES, TIME_SLACK
from rich.table import Table

from autoload import LoaderConfig


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _label(data: dict[str, Any] | None) -> str:
    return "-" if data is None else LoaderConfig.from_dict(data).label()


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="autoload benchmark: tuner vs oracle (best grid point) and baselines")
    for column in ("case", "bottleneck", "oracle", "tuner", "tuner/oracle", "vs defaults",
                   "vs recipe", "tune s / grid s", "trials", "verdict"):
        justify = "left" if column in ("case", "bottleneck", "oracle", "tuner", "verdict") \
            else "right"
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, case in results.items():
        s = case["summary"]
        oracle = case["oracle"]
        oracle_label = _label(None if oracle is None else oracle["config"])
        if oracle is not None and not oracle["tried_by_tuner"]:
            oracle_label += " *"
        style = "green" if s["verdict"] == "PASS" else "red"
        table.add_row(
            name, case["bottleneck"], oracle_label,
            _label(case["tuner"]["config"]) if case["tuner"]["config"] else "failed",
            _fmt_ratio(s["tuner_over_oracle"]), _fmt_ratio(s["speedup_vs_defaults"]),
            _fmt_ratio(s["speedup_vs_recipe"]),
            f"{s['tune_seconds']:.0f} / {s['grid_seconds']:.0f}",
            str(case["tuner"]["trials"]), f"[{style}]{s['verdict']}[/{style}]",
        )
    starred = any(c["oracle"] is not None and not c["oracle"]["tried_by_tuner"]
                  for c in results.values())
    reused = sorted({str(c["grid"]["reused_from"]) for c in results.values()
                     if c["grid"].get("reused_from")})
    table.caption = (("* the tuner never measured the oracle. " if starred else "")
                     + (f"Grid (oracle, grid s) reused from {', '.join(reused)}, not measured "
                        "in this run; the roles were re-measured here. " if reused else "")
                     + f"Targets: tuner/oracle >= {FIXED_TARGET} (fixed cases), >= "
                     f"{RANDOM_TARGET} (random ones); not below defaults or recipe beyond the "
                     "noise (the larger relative half-range of the two); tune time <= "
                     f"{TIME_SLACK:g} x its budget + 1 s.")
    return table


def spread_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="Re-measured side by side: samples/s over the rounds")
    for column in ("case", "role", "config", "min", "median", "max", "± half-range"):
        table.add_column(column, justify="left" if column in ("case", "role", "config")
                         else "right")
    for name, case in results.items():
        roles = case["roles"]
        for role in ROLES:
            if role not in roles:
                table.add_row(name, role, "failed", "-", "-", "-", "-")
                continue
            sp = case["summary"]["spreads"][role]
            same = [r for r in ROLES if r in roles and r != role and roles[r] == roles[role]
                    and ROLES.index(r) < ROLES.index(role)]
            label = _label(roles[role]) + (f" (= {same[0]})" if same else "")
            table.add_row(name, role, label, f"{sp['min']:,.0f}", f"{sp['median']:,.0f}",
                          f"{sp['max']:,.0f}", f"{100 * sp['half_range']:.1f}%")
        table.add_section()
    return table


def random_table(results: dict[str, dict[str, Any]], summary: dict[str, Any],
                 seed: int | None) -> Table:
    """One row per random workload (its draw and its ratio), the distribution in the caption."""
    table = Table(title=f"Random workloads (seed {seed}): tuner / oracle")
    for column in ("case", "workload", "tuner / oracle", "vs defaults", "vs recipe"):
        table.add_column(column, justify="left" if column in ("case", "workload") else "right")
    for name, case in results.items():
        if not case.get("spec"):
            continue
        s = case["summary"]
        table.add_row(name, case["description"], _fmt_ratio(s["tuner_over_oracle"]),
                      _fmt_ratio(s["speedup_vs_defaults"]), _fmt_ratio(s["speedup_vs_recipe"]))
    table.caption = (f"{summary['count']} workloads: median {summary['median']:.2f}, min "
                     f"{summary['min']:.2f}, max {summary['max']:.2f} (targets: median >= "
                     f"{RANDOM_MEDIAN_TARGET}, each >= {RANDOM_TARGET}, never below a baseline "
                     f"beyond the noise): {summary['verdict']}")
    return table
