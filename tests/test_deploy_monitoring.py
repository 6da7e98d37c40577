"""The shipped dashboard and alert rules against the real /metrics, and a real Prometheus
scraping the mirror."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from engines import Postgres, S3Endpoint
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes
from prometheus import PrometheusProcess, require
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import Metrics

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    MakeMirror = Callable[..., Awaitable[MirrorClient]]
    StartMirrorProcess = Callable[..., MirrorProcess]

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "mirror.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\bmirror_[a-z_]+")
_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def fleet_exprs() -> list[str]:
    """The queries of the panels under the row "Fleet (shared tier)" (the last row)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    row = next(i for i, p in enumerate(panels) if p["title"] == "Fleet (shared tier)")
    assert all(p["type"] != "row" for p in panels[row + 1 :])
    return [t["expr"] for panel in panels[row + 1 :] for t in panel["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


async def served_metric_names(mirror: MirrorClient) -> set[str]:
    async with mirror.get("/metrics") as resp:
        text = await resp.text()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def busy_mirror(hub: FakeUpstream, make_mirror: MakeMirror) -> MirrorClient:
    """A mirror in front of a fake Hub (quota headers), after one pull."""
    hub.auth.scheme, hub.quota.remaining = "bearer", 90
    hub.manifests.put("library/x", "1", manifest_bytes("x"))
    mirror = await make_mirror(hub.url, hosts=("docker.io",))
    async with mirror.get("/v2/x/manifests/1", headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
    return mirror


def used_metric_names() -> set[str]:
    return {name for expr in dashboard_exprs() + alert_exprs() for name in _NAME.findall(expr)}


def declared_sample_names() -> set[str]:
    """The names of every sample `mirror.metrics.Metrics` can serve, whether or not a
    series has any value yet."""
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


_SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": _SUFFIXES}


def test_every_metric_the_dashboard_and_alerts_use_is_declared() -> None:
    used = used_metric_names()
    missing = used - declared_sample_names()
    assert missing == set(), f"not in mirror.metrics.Metrics: {sorted(missing)}"


async def test_every_metric_the_dashboard_and_alerts_use_exists(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """Served by one mirror, but for fleet mode's (test_fleet_row_and_alerts_on_a_replica)."""
    served = await served_metric_names(await busy_mirror(fake_upstream, make_mirror))
    used = {name for name in used_metric_names() if not name.startswith("mirror_shared_")}
    assert len(used) >= 15
    missing = {n for n in used if n not in served and n.removesuffix("_bucket") not in served}
    assert missing == set(), f"not in /metrics: {sorted(missing)}"
    assert all(name.startswith("mirror_") for name in used)


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Cache hit ratio", "Docker Hub quota headroom", "Disk use against budget",
                   "Fleet (shared tier)", "Eviction leader"):  # fmt: skip
        assert wanted in titles
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    # No panel hides another: their cells on the 24-column grid are distinct.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert g["x"] + g["w"] <= 24 and not area & cells, panel["title"]
        cells |= area
    # The fleet row shows the shared tier: each of its panels asks for a shared metric.
    for expr in fleet_exprs():
        assert "mirror_shared_" in expr or 'source="shared"' in expr, expr


# Three replicas: a leads, b led before (its gauges stay where they were), c is a mirror
# without fleet mode (its shared gauges are 0). From minute 1, a has no database; b had
# none for a minute.
_RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mirror_shared_degraded{{instance="a",part="database"}}'
        values: '0 1x40'
      - series: 'mirror_shared_degraded{{instance="a",part="bucket"}}'
        values: '0x40'
      - series: 'mirror_shared_degraded{{instance="b",part="database"}}'
        values: '0 1 0x40'
      - series: 'mirror_shared_leader{{instance="a"}}'
        values: '1x40'
      - series: 'mirror_shared_leader{{instance="b"}}'
        values: '0x40'
      - series: 'mirror_shared_leader{{instance="c"}}'
        values: '0x40'
      - series: 'mirror_shared_size_bytes{{instance="a"}}'
        values: '960x40'
      - series: 'mirror_shared_size_bytes{{instance="b"}}'
        values: '999x40'
      - series: 'mirror_shared_size_bytes{{instance="c"}}'
        values: '0x40'
      - series: 'mirror_shared_max_bytes{{instance="a"}}'
        values: '1000x40'
      - series: 'mirror_shared_max_bytes{{instance="b"}}'
        values: '1000x40'
      - series: 'mirror_shared_max_bytes{{instance="c"}}'
        values: '0x40'
    alert_rule_test:
      - {{eval_time: 5m, alertname: MirrorSharedTierDegraded, exp_alerts: []}}
      - eval_time: 7m
        alertname: MirrorSharedTierDegraded
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, part: database}}
            exp_annotations:
              summary: mirror a cannot reach the shared database
              description: Serving alone for 5 minutes; /readyz says why under "degraded".
      - {{eval_time: 29m, alertname: MirrorSharedTierNearlyFull, exp_alerts: []}}
      - eval_time: 31m
        alertname: MirrorSharedTierNearlyFull
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a}}
            exp_annotations:
              summary: >-
                Shared tier above 95% of shared.max_size for 30 minutes (pins, or eviction
                failing?)
"""


def test_promtool_fires_the_shared_tier_alerts_when_they_should(tmp_path: Path) -> None:
    """`promtool test rules`: the degraded alert after 5 minutes, for the replica and the
    part concerned; nearly full after 30 minutes, by the leader's count alone."""
    promtool = require("promtool")
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(_RULE_TESTS.format(alerts=json.dumps(str(ALERTS))))
    result = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


async def test_prometheus_scrapes_the_mirror(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await busy_mirror(fake_upstream, make_mirror)
    target = f"127.0.0.1:{mirror.server.port}"
    prometheus = PrometheusProcess(tmp_path / "prometheus", [target], [ALERTS])
    await asyncio.to_thread(prometheus.start)
    try:
        deadline = time.monotonic() + 30
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            query = 'mirror_cache_requests_total{kind="manifest",result="miss"}'
            result = await asyncio.to_thread(prometheus.query, query)
            if result:
                break
            await asyncio.sleep(0.5)
        assert result, prometheus.log_tail()
        assert result[0]["value"][1] == "1"  # type: ignore[index]
        quota = await asyncio.to_thread(prometheus.query, "mirror_upstream_ratelimit_remaining")
        assert [r["value"][1] for r in quota] == ["89"]
        up = await asyncio.to_thread(prometheus.query, 'up{job="mirror"}')
        assert [r["value"][1] for r in up] == ["1"]
    finally:
        await asyncio.to_thread(prometheus.stop)


async def test_fleet_row_and_alerts_on_a_replica(
    fake_upstream: FakeUpstream,
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    postgres: Postgres,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A fleet replica (moto, PostgreSQL) after a pull serves every shared metric the
    dashboard and the alerts name; a real Prometheus scraping it answers each query of the
    fleet row, finds the replica leading, and, its database stopped, holds
    MirrorSharedTierDegraded pending for part="database"."""
    for name, value in {"AWS_ACCESS_KEY_ID": moto_s3.access_key,
                        "AWS_SECRET_ACCESS_KEY": moto_s3.secret_key,
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    config = tmp_path / "replica.yaml"
    shared = {"bucket": s3_bucket_name, "endpoint_url": moto_s3.url, "region": moto_s3.region,
              "database": database_url, "max_size": "1GiB"}  # fmt: skip
    config.write_text(json.dumps({"storage": {"path": str(tmp_path / "cache")},
                                  "upstreams": [{"name": "up", "url": fake_upstream.url}],
                                  "shared": shared}))  # fmt: skip
    replica = await asyncio.to_thread(start_mirror_process, "--config", str(config))

    def pull(name: str) -> None:
        layer = fake_upstream.blobs.put(name.encode() * 1000)
        fake_upstream.manifests.put(name, "1", manifest_bytes(layer))
        for path in (f"/v2/{name}/manifests/1", f"/v2/{name}/blobs/{layer}"):
            request = urllib.request.Request(replica.url + path, headers={"Accept": OCI_MANIFEST})
            with urllib.request.urlopen(request, timeout=10) as resp:
                resp.read()

    await asyncio.to_thread(pull, "x")
    prometheus = PrometheusProcess(tmp_path / "prometheus", [replica.host], [ALERTS])
    await asyncio.to_thread(prometheus.start)
    try:

        async def answer(expr: str, within: float = 30) -> list[dict[str, Any]]:
            deadline = time.monotonic() + within
            while not (result := await asyncio.to_thread(prometheus.query, expr)):
                assert time.monotonic() < deadline, f"{expr}: no data\n{prometheus.log_tail()}"
                await asyncio.sleep(0.5)
            return result

        await answer("mirror_shared_uploads_total > 0")  # the layer and the manifest kept
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            replica.url + "/metrics", timeout=5).read().decode())  # fmt: skip
        served = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        used = {name for name in used_metric_names() if name.startswith("mirror_shared_")}
        assert used - served == set(), replica.log()
        for expr in fleet_exprs():  # each valid, and each with data, but for evictions
            if "evict" not in expr:
                await answer(expr)
        [leader] = await answer("mirror_shared_leader == 1")
        assert leader["metric"]["instance"] == replica.host
        postgres.stop()
        try:
            await asyncio.to_thread(pull, "y")  # served alone
            alert = 'ALERTS{alertname="MirrorSharedTierDegraded"}'
            [pending] = await answer(alert)
            assert pending["metric"]["part"] == "database"
            assert pending["metric"]["alertstate"] == "pending"  # firing after 5m
        finally:
            postgres.start()
    finally:
        await asyncio.to_thread(prometheus.stop)
