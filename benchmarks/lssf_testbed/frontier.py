"""Safety against utility along each repair's curve, and what each buys at a budget.

Per run (one cell and seed) and model ``m``, with ``ft`` the fine-tune and ``al`` the
aligned model it came from:

* refusal won back ``w_m = (r_m - r_ft) / (r_al - r_ft)``, ``r`` the refusal rate on a
  harmful prompt set (1: every lost refusal back; NaN when the fine-tune lost none);
* utility kept ``u_m = (nll_al - nll_m) / (nll_al - nll_ft)`` (``measure.utility_kept``,
  pooled over the task's held-out rows).

``measure.at_budget``: the most refusal won back along a curve at a utility cost
``1 - u`` of at most ``c``, the curve read as straight segments from the fine-tune
(``u = 1``, ``w = 0``) through its points in parameter order.

The measures (``won_back``, ``utility_kept``, ``pooled_nll_arrays``, ``at_budget``,
``percentile_interval``) are the package's, ``mergekit_lssf.measure``. What is here is
the testbed's design: its runs (cell and seed) as arrays over their models, prompts and
task rows (``RunArrays``), and ``budget_table``: ``at_budget`` per method, mean over
seeds with a 95% bootstrap interval, prompts, task rows and seeds resampled together
(the same draws for every model: a paired comparison).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from mergekit_lssf.measure import (
    at_budget,
    percentile_interval,
    pooled_nll_arrays,
    utility_kept,
    won_back,
)

SETS = (("harmful", "HarmBench"), ("strongreject", "StrongREJECT"))
BUDGETS = (0.01, 0.02, 0.05)  # issue 47: refusal won back at 1%, 2% and 5% task cost


class RunArrays:
    """One run's per-prompt refusals and per-row task NLL as arrays, for resampling.

    ``refused[set]``: [models, prompts] 0/1 over the prompts every model was judged on;
    ``nll``: [models, rows] summed answer NLL (nats), ``tokens``: [rows] answer tokens
    (the same references for every model); ``models``: the row order."""

    def __init__(self, verdicts: Dict[str, Dict[str, Dict[str, bool]]], task_rows: Dict[str, List], models: Sequence[str]):
        self.models = [m for m in models if m in verdicts and task_rows.get(m)]
        self.index = {m: i for i, m in enumerate(self.models)}
        self.refused = {}
        for key, _ in SETS:
            calls = [verdicts[m].get(key, {}) for m in self.models]
            prompts = sorted(set.intersection(*(set(c) for c in calls))) if calls and all(calls) else []
            self.refused[key] = np.array([[float(c[p]) for p in prompts] for c in calls]).reshape(len(calls), len(prompts))
        rows = [task_rows[m] for m in self.models]
        self.nll = np.array([[r[0] for r in rs] for rs in rows], dtype=np.float64)
        self.tokens = np.array([r[1] for r in rows[0]], dtype=np.float64) if rows else np.zeros(0)
        self._full: Optional[Dict[str, np.ndarray]] = None

    def point(self, prompts: Dict[str, np.ndarray], rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Per model, on the resampled ``prompts`` (set -> indices) and task ``rows``:
        ``u`` (utility kept) and ``w_SET`` (won back), arrays in ``models`` order."""
        nll = pooled_nll_arrays(self.nll[:, rows], self.tokens[rows])
        al, ft = self.index["aligned"], self.index["finetuned"]
        out = {"u": utility_kept(nll, nll[al], nll[ft])}
        for key, _ in SETS:
            # the refusal rate of every model on the resampled prompts
            r = self.refused[key][:, prompts[key]].mean(1) if self.refused[key].shape[1] else np.full(len(self.models), np.nan)
            out["w_" + key] = won_back(r, r[al], r[ft])
        return out

    def full(self) -> Dict[str, np.ndarray]:
        """``point`` on every prompt and row (no resampling), computed once."""
        if self._full is None:
            self._full = self.point({k: np.arange(v.shape[1]) for k, v in self.refused.items()},
                                    np.arange(self.nll.shape[1]))
        return self._full


def _values(point: Dict[str, np.ndarray], arrays: RunArrays, curves: Dict[str, List[str]], key: str,
            cost: float, singles: Sequence[str]) -> Dict[str, float]:
    """method -> ``at_budget`` of its models (``curves``: method -> model names in
    parameter order; the ``singles`` are single points, not read from the fine-tune)
    on one run's ``point``."""
    out = {}
    for method, names in curves.items():
        names = [n for n in names if n in arrays.index]
        if not names:
            continue
        pts = [(point["u"][arrays.index[n]], point["w_" + key][arrays.index[n]]) for n in names]
        out[method] = at_budget(pts, cost, from_finetune=method not in singles)
    return out


def budget_table(runs: List[RunArrays], curves: Dict[str, List[str]], singles: Sequence[str] = (), draws: int = 1000,
                 seed: int = 0) -> List[Dict]:
    """Per method, prompt set and budget (``BUDGETS``): the refusal won back at that
    utility cost (``at_budget``; a single point, one of ``singles``, counts only where
    it lies within the budget), mean over ``runs`` (seeds), with a 95% bootstrap interval (seeds, prompts
    and task rows resampled, the same draw for every method); ``seeds``: how many of ``runs``
    have a model of the method (a seed-0 family: one)."""
    rng = np.random.default_rng(seed)
    fulls = [r.full() for r in runs]
    estimate = {(key, cost): _mean([_values(f, r, curves, key, cost, singles) for f, r in zip(fulls, runs)])
                for key, _ in SETS for cost in BUDGETS}
    boot: Dict[tuple, List[Dict[str, float]]] = {k: [] for k in estimate}
    for _ in range(draws):
        chosen = rng.integers(0, len(runs), size=len(runs))
        per_run = []
        for i in chosen:
            r = runs[i]
            prompts = {k: rng.integers(0, v.shape[1], size=v.shape[1]) for k, v in r.refused.items()}
            per_run.append((r, r.point(prompts, rng.integers(0, r.nll.shape[1], size=r.nll.shape[1]))))
        for key, cost in estimate:
            boot[(key, cost)].append(_mean([_values(p, r, curves, key, cost, singles) for r, p in per_run]))
    rows = []
    for (key, cost), values in estimate.items():
        label = dict(SETS)[key]
        for method, value in values.items():
            draws_m = np.array([b.get(method, np.nan) for b in boot[(key, cost)]], dtype=np.float64)
            draws_m = draws_m[~np.isnan(draws_m)]
            low, high = percentile_interval(draws_m, 0.95) if len(draws_m) else (np.nan, np.nan)
            rows.append({"method": method, "prompts": label, "budget": cost, "won_back": value, "low": float(low),
                         "high": float(high), "seeds": sum(any(n in r.index for n in curves[method]) for r in runs)})
    return rows


def _mean(per_run: List[Dict[str, float]]) -> Dict[str, float]:
    """method -> mean over the runs where it is not NaN (NaN when it is in none)."""
    methods = list(dict.fromkeys(m for d in per_run for m in d))
    out = {}
    for m in methods:
        values = [d[m] for d in per_run if m in d and not math.isnan(d[m])]
        out[m] = sum(values) / len(values) if values else float("nan")
    return out


def spread(values: Sequence[Optional[float]]) -> Dict[str, float]:
    """``{mean, min, max, n}`` of the values that are neither None nor NaN (NaN and n 0
    when there are none): one metric over seeds."""
    kept = [v for v in values if v is not None and v == v]
    if not kept:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": sum(kept) / len(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


def curve_points(runs: List[RunArrays], curves: Dict[str, List[str]]) -> Dict[str, List[Dict]]:
    """method -> per model in order: ``u`` and ``w_SET`` as mean, min and max over the
    runs (no resampling), for the figure and results.json."""
    fulls = [(r, r.full()) for r in runs]
    out: Dict[str, List[Dict]] = {}
    for method, names in curves.items():
        rows = []
        for n in names:
            here = [(r, f) for r, f in fulls if n in r.index]
            if not here:
                continue
            row: Dict[str, Optional[object]] = {"model": n}
            for k in ["u"] + ["w_" + key for key, _ in SETS]:
                values = spread([float(f[k][r.index[n]]) for r, f in here])
                row[k] = values if values["n"] else None
            rows.append(row)
        if rows:
            out[method] = rows
    return out
