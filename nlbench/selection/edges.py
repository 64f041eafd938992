"""Is a selected value at the edge of its search range? Then the best value may lie outside it,
and the entry is ranked with a setting the search could not bracket.

Per Optuna parameter of the selected trial (its distribution says the range):
* float: the value's position in [low, high] (in log space when log=true) is within
  EDGE_FRACTION of either end;
* int: the value is low or high (an int range is a grid of its own);
* categorical with numeric choices: the smallest or the largest choice (with two choices every
  choice is an edge: two points cannot bracket an optimum); non-numeric choices are not ordered,
  never flagged; a single choice is not a search.
"""

from __future__ import annotations

import math

EDGE_FRACTION = 0.05


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def edge_of(value, distribution) -> str | None:
    """'low', 'high' or None for one parameter value and its Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        if len(choices) < 2 or not all(_numeric(c) for c in choices) or not _numeric(value):
            return None
        if value == min(choices):
            return "low"
        if value == max(choices):
            return "high"
        return None
    lo, hi = distribution.low, distribution.high
    if hi <= lo:
        return None
    if isinstance(distribution, IntDistribution):
        return "low" if value <= lo else "high" if value >= hi else None
    if isinstance(distribution, FloatDistribution):
        if distribution.log:
            pos = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
        else:
            pos = (value - lo) / (hi - lo)
        return "low" if pos <= EDGE_FRACTION else "high" if pos >= 1 - EDGE_FRACTION else None
    return None


def edge_flags(trial) -> dict[str, dict]:
    """{parameter: {value, edge, range}} of the trial's parameters that sit at an edge."""
    out = {}
    for name, value in trial.params.items():
        d = trial.distributions[name]
        side = edge_of(value, d)
        if side is None:
            continue
        rng = list(d.choices) if hasattr(d, "choices") else [d.low, d.high]
        out[name] = {"value": value, "edge": side, "range": rng}
    return out
