"""Figures, targets and output (markdown and JSON) of benchmarks/run.py.

A figure holds one value per round for each contender; the table shows the median and,
in brackets, its ratio to the median of the figure's reference contender, measured in
the same run (the machines are shared and noisy, so absolute numbers travel badly).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_servers import MIRROR, NGINX, NGINX_CACHE


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
    text: str
    judge: Judge


def ratio_at_most(key: str, limit: float, reference: str | None = None) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        figure = results.figures.get(key)
        ratio = figure.ratio(MIRROR, reference) if figure else None
        return UNMEASURED if ratio is None else (f"{ratio:.2f}x", ratio <= limit)

    return judge


def ratio_at_least(key: str, limit: float, reference: str | None = None) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        figure = results.figures.get(key)
        ratio = figure.ratio(MIRROR, reference) if figure else None
        return UNMEASURED if ratio is None else (f"{ratio:.2f}x", ratio >= limit)

    return judge


def worst_at_most(keys: list[str], limit: float, unit: str, digits: int = 1) -> Judge:
    """The highest value over every round of every figure in `keys`."""

    def judge(results: Results) -> tuple[str, bool | None]:
        figures = [results.figures.get(k) for k in keys]
        values = [f.worst(MIRROR, highest=True) for f in figures if f]
        seen = [v for v in values if v is not None]
        return UNMEASURED if not seen else (f"{max(seen):.{digits}f} {unit}", max(seen) <= limit)

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


def median_at_least(key: str, limit: float, unit: str) -> Judge:
    def judge(results: Results) -> tuple[str, bool | None]:
        figure = results.figures.get(key)
        value = figure.median(MIRROR) if figure else None
        return UNMEASURED if value is None else (f"{value:.0f} {unit}", value >= limit)

    return judge


TARGETS = [
    Target("cold blob GET time <= 1.15x direct", ratio_at_most("get.cold.seconds", 1.15)),
    Target(
        "8 concurrent cold clients: exactly 1 upstream GET of the blob (every round)",
        every_round_equals("crowd.upstream_gets", 1, "GETs"),
    ),
    Target(
        "8 concurrent cold clients: wall <= 1.15x direct (8 clients GETting the upstream)",
        ratio_at_most("crowd.wall", 1.15),
    ),
    Target(
        "8 concurrent cold clients: each client's first body byte within 0.15 s (worst round)",
        worst_at_most(["crowd.first_byte_max"], 0.15, "s", 4),
    ),
    Target("warm big-blob GET >= 0.95x nginx sendfile MB/s", ratio_at_least("get.warm.mbps", 0.95)),
    Target(
        "wrk 1 MiB cached blob >= 0.8x nginx (sendfile) req/s",
        ratio_at_least("wrk.blob.rps", 0.8, NGINX),
    ),
    Target(
        "wrk 1 MiB cached blob >= 0.8x nginx-cache req/s (reported too)",
        ratio_at_least("wrk.blob.rps", 0.8, NGINX_CACHE),
    ),
    Target(
        "wrk manifest by digest >= 20000 req/s",
        median_at_least("wrk.manifest.rps", 20000, "req/s"),
    ),
    Target(
        "cold skopeo copy of the 5 x 1 MiB image <= 1.05x direct",
        ratio_at_most("skopeo.cold.small", 1.05),
    ),
    Target(
        "peak RSS <= 100 MiB under wrk (worst phase)",
        worst_at_most(["rss.wrk.blob", "rss.wrk.manifest"], 100, "MiB"),
    ),
    Target(
        "peak RSS <= 60 MiB streaming one cold blob to 8 clients (worst round)",
        worst_at_most(["rss.crowd"], 60, "MiB"),
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
    yield "| target (mirror) | measured | verdict |"
    yield "|---|---|---|"
    for target in TARGETS:
        measured, met = target.judge(results)
        yield f"| {target.text} | {measured} | {verdict(met)} |"


def _measured(results: Results, contender: str) -> bool:
    return any(contender in f.values or contender in f.errors for f in results.figures.values())


def write_json(results: Results, path: Path) -> None:
    targets = []
    for target in TARGETS:
        measured, met = target.judge(results)
        targets.append({"target": target.text, "measured": measured, "met": met})
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
