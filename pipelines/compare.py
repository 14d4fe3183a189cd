"""Paired bootstrap comparisons of evaluated models: the numbers `ogpsa report` ranks settings by, each
with its 95% interval.

Every run of a report is scored on the same probes (`ogpsa eval` keeps each capability probe's answer
NLL sum and token count, and each harmful and benign probe's refusal flag, with a hash of the probe
list). A replicate draws probe indices with replacement once per probe set and applies the same
indices to every model, so the differences between models are resampled paired, as they were
measured. Runs that differ only by `seed` form one row (a `Cell` with several members): a replicate
also draws the seeds with replacement (positions into each row's sorted seed list, the same positions
for every row, so rows with the same seeds stay paired by seed), and averages over the drawn seeds.
Replicate 0 is the sample itself (every probe, every seed once): the point estimate.

Per row, against its plain row (the plain run trained with the same non-`ogpsa_*` settings):
  tax avoided on source X   1 - mean_s(rise_s) / mean_s(plain rise_s), a rise being the NLL on X
                            minus the starting model's
  Δ refusal, Δ over-refusal mean_s(rate_s - plain rate_s) on harmful and on benign prompts
A row is at plain's refusal when the upper end of its Δ refusal interval is at least 0: the interval
includes 0, or the run refuses more. Without per-probe data (an eval.json from before they were
kept) there is no interval, and the rule falls back to the point estimate (Δ >= 0).

Pure numpy; no model is loaded here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

REPLICATES = 2000
SEED = 0
LEVEL = 0.95


@dataclasses.dataclass
class Point:
    """One evaluated model: its flat metrics and, where kept, its per-probe scores."""

    metrics: dict[str, Any]
    capability: dict[str, tuple[np.ndarray, np.ndarray, str]]  # label -> (nll sums, token counts, probes hash)
    flags: dict[str, tuple[np.ndarray, str]]  # "harmful" / "benign" -> (refusal flags, probes hash)

    @classmethod
    def from_eval(cls, ev: dict | None, metrics: dict[str, Any]) -> "Point":
        cap, flags = {}, {}
        for label, block in ((ev or {}).get("capability") or {}).items():
            per = block.get("per_probe")
            if per and per.get("nll_sum"):
                cap[label] = (np.asarray(per["nll_sum"], float), np.asarray(per["n_tokens"], float), block.get("probes_hash", ""))
        for key, name in (("safety", "harmful"), ("over_refusal", "benign")):
            block = (ev or {}).get(key) or {}
            if block.get("flags"):
                flags[name] = (np.asarray(block["flags"], float), block.get("probes_hash", ""))
        return cls(dict(metrics or {}), cap, flags)


@dataclasses.dataclass
class Member:
    """One seed's run at one stage: the point, its starting model, and its plain run's point and start."""

    seed: Any
    point: Point
    base: Point | None
    plain: Point | None
    plain_base: Point | None


@dataclasses.dataclass
class Interval:
    value: float
    low: float | None = None
    high: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None


class Bootstrap:
    """Probe and seed resampling shared by every number of one report, so all of them are paired."""

    def __init__(self, replicates: int = REPLICATES, seed: int = SEED, level: float = LEVEL):
        self.replicates, self.level = replicates, level
        self.rng = np.random.default_rng(seed)
        self._probe_index: dict[tuple, np.ndarray] = {}
        self._seed_draws = np.empty((replicates, 0))

    def probes(self, kind: str, n: int, probes_hash: str) -> np.ndarray:
        """(replicates + 1, n) indices for one probe set: row 0 every probe, then resamples."""
        key = (kind, n, probes_hash)
        if key not in self._probe_index:
            draws = self.rng.integers(0, n, size=(self.replicates, n))
            self._probe_index[key] = np.vstack([np.arange(n)[None, :], draws])
        return self._probe_index[key]

    def seed_positions(self, count: int) -> np.ndarray:
        """(replicates + 1, count) positions into a row's sorted seeds: row 0 each once, then draws. Rows
        with as many seeds get the same positions (paired by seed)."""
        if self._seed_draws.shape[1] < count:
            more = self.rng.random((self.replicates, count - self._seed_draws.shape[1]))
            self._seed_draws = np.hstack([self._seed_draws, more])
        draws = np.minimum((self._seed_draws[:, :count] * count).astype(int), count - 1)
        return np.vstack([np.arange(count)[None, :], draws])

    def interval(self, values: np.ndarray) -> Interval | None:
        """Point estimate (replicate 0) and the central `level` interval of the replicates."""
        if values is None or not np.isfinite(values[0]):
            return None
        rest = values[1:][np.isfinite(values[1:])]
        if len(rest) < 0.5 * self.replicates:
            return Interval(float(values[0]))
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(rest, [tail, 100 - tail])
        return Interval(float(values[0]), float(low), float(high))


def _same(a: str, b: str) -> bool:
    return bool(a) and a == b


class Cell:
    """One report row: a stage (or averaged point) of one setting, over its seeds."""

    def __init__(self, members: list[Member], boot: Bootstrap):
        self.members = sorted(members, key=lambda m: str(m.seed))
        self.boot = boot

    # ---- per-member vectors over replicates (None where the data cannot be paired) -------------
    def _nll(self, point: Point | None, label: str, ref: Point) -> np.ndarray | None:
        """`point`'s NLL on `label` per replicate, on the probe indices of `ref`'s probe set."""
        if point is None or label not in point.capability or label not in ref.capability:
            return None
        sums, counts, h = point.capability[label]
        rsums, _, rh = ref.capability[label]
        if len(sums) != len(rsums) or not _same(h, rh):
            return None
        idx = self.boot.probes("nll/" + label, len(sums), h)
        with np.errstate(divide="ignore", invalid="ignore"):
            return sums[idx].sum(1) / counts[idx].sum(1)

    def _rate(self, point: Point | None, name: str, ref: Point) -> np.ndarray | None:
        if point is None or name not in point.flags or name not in ref.flags:
            return None
        flags, h = point.flags[name]
        if len(flags) != len(ref.flags[name][0]) or not _same(h, ref.flags[name][1]):
            return None
        return flags[self.boot.probes(name, len(flags), h)].mean(1)

    def _over_seeds(self, per_member: list[np.ndarray | None]) -> np.ndarray | None:
        """(replicates + 1, seeds) -> mean over the drawn seeds per replicate."""
        if any(v is None for v in per_member):
            return None
        stacked = np.stack(per_member, axis=1)
        pos = self.boot.seed_positions(len(per_member))
        return np.take_along_axis(stacked, pos, axis=1).mean(1)

    def _ref(self) -> Point:
        return self.members[0].point

    # ---- the compared numbers -----------------------------------------------------------------
    def tax_avoided(self, label: str) -> Interval | None:
        """1 - rise / plain's rise on `label`, the rises averaged over the drawn seeds."""
        ref, key = self._ref(), "nll/" + label
        vals = [(m.point.metrics.get(key), (m.base or m.plain_base or Point({}, {}, {})).metrics.get(key),
                 (m.plain or Point({}, {}, {})).metrics.get(key), (m.plain_base or Point({}, {}, {})).metrics.get(key))
                for m in self.members]
        if any(None in v for v in vals):
            return None
        plain_rise = float(np.mean([v[2] - v[3] for v in vals]))
        if plain_rise <= 0:
            return None  # plain did not raise it: no tax to avoid
        point = 1.0 - float(np.mean([v[0] - v[1] for v in vals])) / plain_rise
        rises, plain_rises = [], []
        for m in self.members:
            own, start = self._nll(m.point, label, ref), self._nll(m.base or m.plain_base, label, ref)
            pl, pl_start = self._nll(m.plain, label, ref), self._nll(m.plain_base, label, ref)
            if any(v is None for v in (own, start, pl, pl_start)):
                return Interval(point)
            rises.append(own - start)
            plain_rises.append(pl - pl_start)
        r, p = self._over_seeds(rises), self._over_seeds(plain_rises)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(p > 0, 1.0 - r / p, np.nan)
        found = self.boot.interval(values)
        return Interval(point, found.low, found.high) if found else Interval(point)

    def delta_rate(self, name: str) -> Interval | None:
        """Refusal rate (`harmful`) or over-refusal (`benign`) minus plain's, over the drawn seeds."""
        key = f"refusal_{name}"
        pairs = [(m.point.metrics.get(key), (m.plain.metrics.get(key) if m.plain else None)) for m in self.members]
        if any(None in p for p in pairs):
            return None
        point = float(np.mean([a - b for a, b in pairs]))
        ref = self._ref()
        diffs = []
        for m in self.members:
            own, pl = self._rate(m.point, name, ref), self._rate(m.plain, name, ref)
            if own is None or pl is None:
                return Interval(point)
            diffs.append(own - pl)
        found = self.boot.interval(self._over_seeds(diffs))
        return Interval(point, found.low, found.high) if found else Interval(point)

    def mean_metric(self, key: str) -> float | None:
        vals = [m.point.metrics.get(key) for m in self.members]
        return None if any(v is None for v in vals) else float(np.mean(vals))

    def at_plain_refusal(self) -> bool | None:
        """The matched-safety rule: the Δ refusal interval's upper end is at least 0 (without an
        interval: the point estimate is)."""
        d = self.delta_rate("harmful")
        if d is None:
            return None
        return (d.high if d.has_interval else d.value) >= 0

    # ---- for the frontier -----------------------------------------------------------------------
    def replicates(self, what: str, labels: list[str]) -> np.ndarray | None:
        """Per replicate: the refusal rate (`refusal`) or the mean NLL over `labels` (`nll_mean`)."""
        ref = self._ref()
        per = []
        for m in self.members:
            if what == "refusal":
                per.append(self._rate(m.point, "harmful", ref))
            else:
                nlls = [self._nll(m.point, label, ref) for label in labels]
                per.append(None if any(v is None for v in nlls) or not nlls else np.mean(nlls, axis=0))
        return self._over_seeds(per)


def beats(a: Cell, b: Cell, labels: list[str]) -> bool:
    """`a` dominates `b`: `a`'s NLL mean is lower by its interval (the paired difference's upper end
    below 0), and `a` is at `b`'s refusal or above by the matched-safety rule. Without per-probe data,
    the point estimates decide (lower NLL mean, refusal at least as high)."""
    ra, rb = a.mean_metric("refusal_harmful"), b.mean_metric("refusal_harmful")
    na, nb = a.mean_metric("nll_mean"), b.mean_metric("nll_mean")
    if None in (ra, rb, na, nb):
        return False
    boot = a.boot
    ref_a, ref_b = a.replicates("refusal", labels), b.replicates("refusal", labels)
    nll_a, nll_b = a.replicates("nll_mean", labels), b.replicates("nll_mean", labels)
    if ref_a is not None and ref_b is not None:
        d = boot.interval(ref_a - ref_b)
        safe_enough = d is not None and (d.high if d.has_interval else d.value) >= 0
    else:
        safe_enough = ra >= rb
    if nll_a is not None and nll_b is not None:
        d = boot.interval(nll_a - nll_b)
        better = d is not None and (d.high if d.has_interval else d.value) < 0
    else:
        better = na < nb
    return safe_enough and better


def frontier(cells: list[Cell], labels: list[str]) -> list[bool]:
    """For each cell: no other cell beats it (see `beats`)."""
    return [not any(beats(other, c, labels) for other in cells if other is not c) for c in cells]


def fmt_pct(iv: Interval | None) -> str:
    """'72% [58, 85]' (or '72%' without an interval, '–' without a value)."""
    if iv is None:
        return "–"
    head = f"{100 * iv.value:.0f}%"
    return f"{head} [{100 * iv.low:.0f}, {100 * iv.high:.0f}]" if iv.has_interval else head


def fmt_delta(iv: Interval | None) -> str:
    """'+0.03 [-0.05, +0.09]' for a rate difference."""
    if iv is None:
        return "–"
    head = f"{iv.value:+.2f}"
    return f"{head} [{iv.low:+.2f}, {iv.high:+.2f}]" if iv.has_interval else head
