"""Figures, targets and output (markdown and JSON) of benchmarks/run.py.

A figure holds one value per round for each contender; the table shows the median and,
in brackets, its ratio to the median of the figure's reference contender, measured in
the same run (the machines are shared and noisy, so absolute numbers travel badly). The
CPU figures' reference is the `sha256` column: the CPU seconds hashlib's SHA-256 spends
on the same bytes, on one core, measured in the same rounds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_servers import BARE, DIRECT, MIRROR, NGINX, NGINX_CACHE

SHA256 = "sha256"  # the column of CPU references: hashing the same bytes, one core


@dataclass
class Figure:
    label: str
    unit: str
    reference: str | None  # the contender ratios are taken against; None: no ratio
    digits: int = 3
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, contender: str) -> float | None:
        values = self.values.get(contender)
        return statistics.median(values) if values else None

    def worst(self, contender: str, highest: bool) -> float | None:
        values = self.values.get(contender)
        if not values:
            return None
        return max(values) if highest else min(values)

    def ratio(self, contender: str, reference: str | None = None) -> float | None:
        mine, ref = self.median(contender), self.median(reference or self.reference or "")
        return mine / ref if mine is not None and ref else None

    def cell(self, contender: str) -> str:
        if contender in self.errors:
            return "error"
        value = self.median(contender)
        if value is None:
            return ""
        text = f"{value:.{self.digits}f}"
        ratio = self.ratio(contender) if contender != self.reference else None
        return f"{text} ({ratio:.2f}x)" if ratio is not None else text

    def as_json(self) -> dict[str, Any]:
        contenders = sorted(self.values)
        return {
            "label": self.label,
            "unit": self.unit,
            "reference": self.reference,
            "values": self.values,
            "median": {c: self.median(c) for c in contenders},
            "ratio": {c: self.ratio(c) for c in contenders if self.reference},
            "errors": self.errors,
        }


@dataclass
class Results:
    contenders: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    details: dict[str, list[Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def define(
        self, key: str, label: str, unit: str, reference: str | None, digits: int = 3
    ) -> None:
        self.figures.setdefault(key, Figure(label, unit, reference, digits))

    def add(self, key: str, contender: str, value: float) -> None:
        self.figures[key].values.setdefault(contender, []).append(value)

    def detail(self, key: str, item: Any) -> None:
        self.details.setdefault(key, []).append(item)

    def fail(self, keys: list[str], contender: str, message: str) -> None:
        for key in keys:
            self.figures[key].errors[contender] = message
        self.failures.append(f"{contender}: {message}")


# --------------------------------------------------------------------------- targets

Judge = Callable[[Results], tuple[str, bool | None]]  # (what was measured, met; None: not)
UNMEASURED = ("not measured", None)


@dataclass(frozen=True)
class Target:
    figure: str
    goal: str
    judge: Judge


def _ratio(results: Results, key: str, reference: str | None) -> tuple[str, float] | None:
    """The mirror's median over the reference's, shown with both medians."""
    figure = results.figures.get(key)
    if figure is None:
        return None
    ref = reference or figure.reference or ""
    ratio, mine, theirs = figure.ratio(MIRROR, ref), figure.median(MIRROR), figure.median(ref)
    if ratio is None or mine is None or theirs is None:
        return None
    digits = figure.digits
    shown = f"{ratio:.2f}x ({mine:.{digits}f} / {theirs:.{digits}f} {figure.unit}, {ref})"
    return shown, ratio


def ratio_at_most(key: str, limit: float, reference: str | None = None) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        found = _ratio(results, key, reference)
        return UNMEASURED if found is None else (found[0], found[1] <= limit)

    return judge


def ratio_at_least(key: str, limit: float, reference: str | None = None) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        found = _ratio(results, key, reference)
        return UNMEASURED if found is None else (found[0], found[1] >= limit)

    return judge


def worst_at_most(keys: list[str], limit: float, unit: str, digits: int = 1) -> Judge:
    """The highest value over every round of every figure in `keys`."""

    def judge(results: Results) -> tuple[str, bool | None]:
        figures = [results.figures.get(k) for k in keys]
        values = [f.worst(MIRROR, highest=True) for f in figures if f]
        seen = [v for v in values if v is not None]
        return UNMEASURED if not seen else (f"{max(seen):.{digits}f} {unit}", max(seen) <= limit)

    return judge


def medians_at_most(groups: list[list[str]], limit: float, unit: str) -> Judge:
    """For each group, the highest median among its figures; met when every group's is
    within `limit`. The worst single round is shown alongside."""

    def judge(results: Results) -> tuple[str, bool | None]:
        medians, worst = [], []
        for keys in groups:
            figures = [f for f in (results.figures.get(k) for k in keys) if f]
            ms = [m for m in (f.median(MIRROR) for f in figures) if m is not None]
            ws = [w for w in (f.worst(MIRROR, highest=True) for f in figures) if w is not None]
            if not ms:
                return UNMEASURED
            medians.append(max(ms))
            worst.append(max(ws))
        shown = " / ".join(f"{m:.1f}" for m in medians)
        worst_shown = " / ".join(f"{w:.1f}" for w in worst)
        return f"{shown} {unit} (worst rounds {worst_shown})", all(m <= limit for m in medians)

    return judge


def every_round_equals(key: str, expected: float, unit: str) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        figure = results.figures.get(key)
        values = figure.values.get(MIRROR) if figure else None
        if not values:
            return UNMEASURED
        shown = ", ".join(f"{v:g}" for v in values)
        return f"{shown} {unit}", all(v == expected for v in values)

    return judge


# Issue 20's table first (medians of the rounds, each ratio to a reference measured in
# the same run), then the project's earlier targets it does not replace.
TARGETS = [
    Target(
        "manifest by digest, wrk 16 connections: req/s / bare aiohttp",
        ">= 0.7",
        ratio_at_least("wrk.manifest.rps", 0.7, BARE),
    ),
    Target(
        "1 MiB cached blob, wrk: req/s / nginx",
        ">= 0.9",
        ratio_at_least("wrk.blob.rps", 0.9, NGINX),
    ),
    Target(
        "cold big blob GET: mirror CPU-seconds / SHA-256 CPU-seconds for the same bytes",
        "<= 1.6",
        ratio_at_most("cpu.get.cold", 1.6, SHA256),
    ),
    Target(
        "cold skopeo copy 5 x 1 MiB / direct",
        "<= 1.05",
        ratio_at_most("skopeo.cold.small", 1.05, DIRECT),
    ),
    Target(
        "warm big blob GET MB/s / nginx",
        ">= 0.95",
        ratio_at_least("get.warm.mbps", 0.95, NGINX),
    ),
    Target(
        "peak RSS under wrk / streaming one cold blob to 8 clients",
        "<= 60 / <= 60 MiB",
        medians_at_most([["rss.wrk.blob", "rss.wrk.manifest"], ["rss.crowd"]], 60, "MiB"),
    ),
    Target(
        "cold blob GET time / direct", "<= 1.15", ratio_at_most("get.cold.seconds", 1.15, DIRECT)
    ),
    Target(
        "8 concurrent cold clients: upstream GETs of the blob (every round)",
        "exactly 1",
        every_round_equals("crowd.upstream_gets", 1, "GETs"),
    ),
    Target(
        "8 concurrent cold clients: wall / direct (8 clients GETting the upstream)",
        "<= 1.15",
        ratio_at_most("crowd.wall", 1.15, DIRECT),
    ),
    Target(
        "8 concurrent cold clients: each client's first body byte (worst round)",
        "<= 0.15 s",
        worst_at_most(["crowd.first_byte_max"], 0.15, "s", 4),
    ),
    Target(
        "1 MiB cached blob, wrk: req/s / nginx-cache (reported too)",
        ">= 0.9",
        ratio_at_least("wrk.blob.rps", 0.9, NGINX_CACHE),
    ),
]


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


# --------------------------------------------------------------------------- output


def markdown(results: Results) -> Iterator[str]:
    """The figures table, then the targets table (for the mirror)."""
    shown = [c for c in results.contenders if _measured(results, c)]
    yield "| figure | " + " | ".join(shown) + " | ratio vs |"
    yield "|---|" + "---|" * len(shown) + "---|"
    for figure in results.figures.values():
        if figure.values or figure.errors:
            cells = [figure.cell(c) for c in shown]
            label = f"{figure.label} ({figure.unit})"
            yield f"| {label} | " + " | ".join(cells) + f" | {figure.reference or ''} |"
    yield ""
    yield "| target (mirror; medians) | measured | target | verdict |"
    yield "|---|---|---|---|"
    for target in TARGETS:
        measured, met = target.judge(results)
        yield f"| {target.figure} | {measured} | {target.goal} | {verdict(met)} |"


def _measured(results: Results, contender: str) -> bool:
    return any(contender in f.values or contender in f.errors for f in results.figures.values())


def write_json(results: Results, path: Path) -> None:
    targets = []
    for target in TARGETS:
        measured, met = target.judge(results)
        targets.append(
            {"target": target.figure, "goal": target.goal, "measured": measured, "met": met}
        )
    document = {
        "meta": results.meta,
        "contenders": results.contenders,
        "figures": {key: f.as_json() for key, f in results.figures.items()},
        "targets": targets,
        "details": results.details,
        "failures": results.failures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
