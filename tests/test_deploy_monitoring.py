"""The shipped dashboard and alert rules against the real /metrics, and a real Prometheus
scraping the mirror."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from fake_upstream import OCI_MANIFEST, FakeUpstream, manifest_bytes
from prometheus import PrometheusProcess, require
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import MirrorClient

    MakeMirror = Callable[..., Awaitable[MirrorClient]]

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "mirror.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
_NAME = re.compile(r"\bmirror_[a-z_]+")
_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


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


async def test_every_metric_the_dashboard_and_alerts_use_exists(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    served = await served_metric_names(await busy_mirror(fake_upstream, make_mirror))
    exprs = dashboard_exprs() + alert_exprs()
    used = {name for expr in exprs for name in _NAME.findall(expr)}
    assert len(used) >= 15
    missing = {n for n in used if n not in served and n.removesuffix("_bucket") not in served}
    assert missing == set(), f"not in /metrics: {sorted(missing)}"
    assert all(name.startswith("mirror_") for name in used)


def test_dashboard_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Cache hit ratio", "Docker Hub quota headroom", "Disk use against budget"):
        assert wanted in titles
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


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
