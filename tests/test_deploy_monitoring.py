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


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under the row `title`, up to the next row."""
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["title"] == title and p["type"] == "row")
    end = next((i for i, p in enumerate(panels) if i > start and p["type"] == "row"), None)
    return panels[start + 1 : end]


def fleet_exprs() -> list[str]:
    """The queries of the panels under the row "Fleet (shared tier)"."""
    return [t["expr"] for panel in row_panels("Fleet (shared tier)") for t in panel["targets"]]


ONE_FETCH = "Fleet: one fetch per fleet"
HEADLINE = "Upstream bytes per byte served (fleet)"
# The headline figure, for the whole fleet: every replica's upstream bytes (of every
# upstream) over every replica's bytes served (from any source).
HEADLINE_EXPR = (
    "sum(rate(mirror_upstream_bytes_total[{window}]))"
    " / sum(rate(mirror_served_bytes_total[{window}]))"
)


def one_fetch_exprs() -> list[str]:
    """The queries of the panels under the row "Fleet: one fetch per fleet" (the last
    row), with Grafana's $__range as an hour."""
    return [t["expr"].replace("$__range", "1h") for panel in row_panels(ONE_FETCH)
            for t in panel["targets"]]  # fmt: skip


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
                   "Fleet (shared tier)", "Eviction leader", ONE_FETCH, HEADLINE):  # fmt: skip
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
    # One fetch per fleet (the last row): the headline, a stat over the time range shown
    # and a time series, then leases, peer bytes and peer requests.
    panels = {panel["title"]: panel for panel in row_panels(ONE_FETCH)}
    assert all(panel["type"] != "row" for panel in dashboard["panels"][-len(panels) :])
    stat, series = panels[HEADLINE], panels[HEADLINE + ", over time"]
    assert stat["type"] == "stat" and series["type"] == "timeseries"
    assert [t["expr"] for t in stat["targets"]] == [HEADLINE_EXPR.format(window="$__range")]
    assert stat["targets"][0]["instant"]
    assert [t["expr"] for t in series["targets"]] == [HEADLINE_EXPR.format(window="5m")]
    assert stat["fieldConfig"]["defaults"]["unit"] == series["fieldConfig"]["defaults"]["unit"]
    rest = {name for title, panel in panels.items() if title not in (HEADLINE, series["title"])
            for t in panel["targets"] for name in _NAME.findall(t["expr"])}  # fmt: skip
    assert {"mirror_fleet_leases_total", "mirror_peer_bytes_total",
            "mirror_peer_requests_total"} <= rest  # fmt: skip


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


# Three replicas: a refuses peer requests from minute 1 on (another replica has another
# fleet secret), b for three minutes (a rollout of a new secret), c never. a fetched from
# two upstreams 150 bytes/s in all, while each replica served 200 bytes/s.
_PEER_RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mirror_peer_requests_total{{instance="a",result="refused"}}'
        values: '0+1x40'
      - series: 'mirror_peer_requests_total{{instance="a",result="served"}}'
        values: '0+3x40'
      - series: 'mirror_peer_requests_total{{instance="b",result="refused"}}'
        values: '0 1 2 3 3x40'
      - series: 'mirror_peer_requests_total{{instance="c",result="refused"}}'
        values: '0x40'
      - series: 'mirror_peer_requests_total{{instance="c",result="served"}}'
        values: '0+5x40'
      - series: 'mirror_upstream_bytes_total{{instance="a",upstream="docker-hub"}}'
        values: '0+6000x40'
      - series: 'mirror_upstream_bytes_total{{instance="a",upstream="ghcr"}}'
        values: '0+3000x40'
      - series: 'mirror_upstream_bytes_total{{instance="b",upstream="docker-hub"}}'
        values: '0x40'
      - series: 'mirror_served_bytes_total{{instance="a",source="upstream"}}'
        values: '0+12000x40'
      - series: 'mirror_served_bytes_total{{instance="b",source="cache"}}'
        values: '0+12000x40'
      - series: 'mirror_served_bytes_total{{instance="c",source="shared"}}'
        values: '0+3000x40'
      - series: 'mirror_served_bytes_total{{instance="c",source="cache"}}'
        values: '0+9000x40'
    alert_rule_test:
      - {{eval_time: 10m, alertname: MirrorPeerRequestsRefused, exp_alerts: []}}
      - eval_time: 12m
        alertname: MirrorPeerRequestsRefused
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, result: refused}}
            exp_annotations:
              summary: 'mirror a refuses peer requests: a wrong or missing fleet secret'
              description: >-
                Peer requests refused for 10 minutes. The replica's log names each address
                refused, and why ("peer request from ... refused"), once per address; give
                every replica the same secret (shared.peer_secret, or peer_secret_env's
                variable).
    promql_expr_test:
      - expr: {headline}
        eval_time: 20m
        exp_samples:
          - labels: '{{}}'
            value: 0.25
"""


def test_promtool_fires_the_peer_alert_and_computes_the_headline(tmp_path: Path) -> None:
    """`promtool test rules`: MirrorPeerRequestsRefused fires after 10 minutes of refusals,
    for the replica refusing, and not for a few minutes of them; the dashboard's headline
    (its time series' query) is the fleet's upstream bytes, all upstreams and replicas,
    over its bytes served, all sources and replicas."""
    promtool = require("promtool")
    [series] = [p for p in row_panels(ONE_FETCH) if p["title"] == HEADLINE + ", over time"]
    [headline] = [t["expr"] for t in series["targets"]]
    tests = tmp_path / "peer_alerts_test.yml"
    tests.write_text(_PEER_RULE_TESTS.format(alerts=json.dumps(str(ALERTS)),
                                             headline=json.dumps(headline)))  # fmt: skip
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
    fleet rows, finds the replica leading, and, its database stopped, holds
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
        for expr in one_fetch_exprs():  # each valid, and each with data
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
