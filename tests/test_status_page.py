"""The status page at `/` and `/status.json`: `mirror serve` over a real docker-registry,
pulled with skopeo, the page rendered by a real headless Chromium (Debian's `chromium`).

MIRROR_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/status.png (the README's).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import REPO, USERS, downloads_stored, write_htpasswd
from fake_upstream import FakeUpstream
from pytest_aiohttp import AiohttpClient
from upstream_registry import (
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    free_loopback_port,
    push_image,
    require_tool,
    skopeo_copy_async,
)

from mirror import activity
from mirror.activity import Activity, Served
from mirror.app import make_app
from mirror.config import Config, StorageConfig, UpstreamConfig, config_from_dict
from mirror.errors import ConfigError
from mirror.proxy.health import UpstreamHealth
from mirror.web import status

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]
    MakeMirror = Callable[..., Awaitable[MirrorClient]]

KIB = 1024
CHROMIUM_TIMEOUT = 60.0
HTTP_TIMEOUT = 10.0


# --- a real browser ---------------------------------------------------------------------


def chromium(*args: str) -> str:
    """Headless Chromium with a fresh profile, bounded in time; its standard output."""
    browser = require_tool("chromium", "apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [
            browser,
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def rendered_dom(url: str) -> str:
    return chromium("--virtual-time-budget=2000", "--dump-dom", url)


class Texts(HTMLParser):
    """The text inside each element with an id, the tables' rows, and whether any script
    element or event-handler attribute made it into the document."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self.handlers = 0
        self._open: list[tuple[str, str | None]] = []  # (tag, id)
        self._table: str | None = None
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.scripts += tag == "script"
        self.handlers += sum(name.startswith("on") for name in names)
        if tag == "table":
            self._table = names.get("id")
        if tag == "tr" and self._table is not None:
            self.rows.setdefault(self._table, []).append([])
        if tag in ("td", "th") and self._table in self.rows:
            self.rows[self._table][-1].append("")
        if tag not in ("meta", "br", "link", "img", "input"):
            self._open.append((tag, names.get("id")))
        if names.get("id"):
            self.by_id[str(names["id"])] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id is not None:
                self.by_id[element_id] += data
        if self._table in self.rows and self.rows[self._table] and self.rows[self._table][-1]:
            self.rows[self._table][-1][-1] += data


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- HTTP -------------------------------------------------------------------------------


def get(url: str, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def status_json(mirror: MirrorProcess) -> dict[str, Any]:
    code, headers, body = get(f"{mirror.url}/status.json")
    assert code == 200, body
    assert headers["Content-Type"].startswith("application/json")
    return dict(json.loads(body))


def settled(
    mirror: MirrorProcess,
    counted: Callable[[dict[str, Any]], bool] = lambda _: True,
    deadline: float = 10.0,
) -> dict[str, Any]:
    """The status once no fetch is in flight (every blob served is cached by then) and
    `counted` holds: a hit's bytes are counted just after they are sent, so a client can
    have them all and ask for the status first. The last status, if it never holds."""
    end = time.monotonic() + deadline
    while True:
        current = status_json(mirror)
        if current["fetches_in_flight"] == 0 and counted(current):
            return current
        if time.monotonic() > end:
            return current
        time.sleep(0.05)


async def pull(mirror: MirrorClient, image: PushedImage) -> None:
    """The manifest by digest, then every blob, as a client pulling an image does."""
    headers = {"Accept": OCI_MANIFEST}
    async with mirror.get(f"/v2/{image.name}/manifests/{image.tag}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    for digest in [image.config_digest, *image.layer_digests]:
        async with mirror.get(f"/v2/{image.name}/blobs/{digest}") as resp:
            assert resp.status == 200
            await resp.read()
    await downloads_stored(mirror)


def worker_serving(mirror: MirrorProcess, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while "serving cache hits" not in mirror.log():
        assert time.monotonic() < end, f"no worker started:\n{mirror.log()}"
        time.sleep(0.05)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def pulled_bytes(directory: Path) -> int:
    """What skopeo received: the manifest and every blob (not its own `version` file)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name != "version")


# --- the page, end to end -------------------------------------------------------------------


async def test_the_page_in_chromium_after_cold_and_warm_pulls(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    images = [
        await push_image(registry.url, "team/app", "v1", [96 * KIB, 32 * KIB]),
        await push_image(registry.url, "tools/cli", "1.0", [48 * KIB]),
    ]
    storage = ["--storage", str(tmp_path / "cache"), "--max-size", "4MiB"]  # a bar to see
    mirror = start_mirror_process(*storage, "--upstream", registry.url)
    sizes: dict[str, int] = {}
    for image in images:
        for pull in ("cold", "warm"):
            dest = tmp_path / f"{image.name.replace('/', '-')}-{pull}"
            await skopeo_copy_async(f"{mirror.host}/{image.reference}", dest)
            sizes[image.name] = pulled_bytes(dest)
            settled(mirror)  # cached, before the warm pull asks for it
    total = sum(sizes.values())

    # Each pull asks for the manifest and each blob once: all misses, then all hits.
    figures = settled(
        mirror,
        lambda f: (
            f["since_start"]["bytes_from_cache"] >= total
            and sum(r["bytes"] for r in f["repositories"]["by_pulls"]) >= 2 * total
        ),
    )
    for window in ("since_start", "last_hour"):
        served = figures[window]
        assert served["hits"] == served["misses"] == 4 + 3  # manifest, config and layers
        assert served["hit_ratio"] == 0.5
        assert served["bytes_from_upstream"] == served["bytes_from_cache"] == total
        assert served["bytes_saved"] == total
    by_pulls = figures["repositories"]["by_pulls"]
    assert {(r["name"], r["pulls"], r["bytes"]) for r in by_pulls} == {
        ("team/app", 2, 2 * sizes["team/app"]),
        ("tools/cli", 2, 2 * sizes["tools/cli"]),
    }
    assert [r["name"] for r in figures["repositories"]["by_bytes"]] == ["team/app", "tools/cli"]
    assert figures["cache"]["blobs"] == 7  # manifests are stored as blobs
    assert 0 < figures["cache"]["used_bytes"] <= figures["cache"]["max_bytes"]
    [upstream] = figures["upstreams"]
    assert (upstream["url"], upstream["healthy"], upstream["last_error"]) == (
        registry.url,
        True,
        None,
    )

    code, headers, page = get(mirror.url + "/")
    assert (code, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    # Nothing to fetch from elsewhere: no images, scripts, style sheets, fonts or frames.
    assert not re.search(rb"<(img|script|link|iframe|object)\b|\bsrc=|url\(|@import", page)

    document = Texts(rendered_dom(mirror.url + "/"))
    assert document.by_id["hit-ratio-since-start"] == "50.0%"
    assert document.by_id["hit-ratio-last-hour"] == "50.0%"
    assert [row[0] for row in document.rows["by-pulls"][1:]] == ["team/app", "tools/cli"]
    assert [row[0] for row in document.rows["by-bytes"][1:]] == ["team/app", "tools/cli"]
    assert document.by_id["fetches-in-flight"] == "0"
    assert document.by_id["version"] == figures["version"]
    assert document.scripts == 0

    screenshot = tmp_path / "status.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1200,700", mirror.url + "/")
    assert png_size(screenshot) == (1200, 700)
    if os.environ.get("MIRROR_UPDATE_SCREENSHOT"):
        shutil.copyfile(screenshot, REPO / "docs" / "status.png")


async def test_with_workers_the_totals_count_every_process(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    """Workers answer hits themselves and hand the page to the primary; the totals come
    from the metrics all processes share, so the hits of every worker are in them."""
    image = await push_image(registry.url, "team/app", "v1", [64 * KIB])
    storage = ["--storage", str(tmp_path / "cache")]
    mirror = start_mirror_process(*storage, "--upstream", registry.url, "--workers", "2")
    worker_serving(mirror)
    await skopeo_copy_async(f"{mirror.host}/{image.reference}", tmp_path / "cold")
    before = settled(mirror)["since_start"]
    # The kernel spreads connections over the processes by source port: all of 16 reach
    # the same one with a chance of 1 in 32,768.
    blob = f"{mirror.url}/v2/{image.name}/blobs/{image.layer_digests[0]}"
    for _ in range(16):
        assert get(blob)[0] == 200  # urllib: a connection of its own each time
    grown = before["bytes_from_cache"] + 16 * 64 * KIB
    after = settled(mirror, lambda f: f["since_start"]["bytes_from_cache"] >= grown)["since_start"]
    assert after["hits"] - before["hits"] == 16
    assert after["bytes_from_cache"] - before["bytes_from_cache"] == 16 * 64 * KIB
    code, _, page = get(mirror.url + "/")
    assert code == 200
    assert "2 processes" in page.decode()


# --- what only the page shows: evictions, upstream errors, the quota ------------------------


async def test_evictions_are_listed_latest_first(
    registry: RegistryProcess, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    images = [await push_image(registry.url, f"lru/i{n}", "v1", [700 * KIB]) for n in range(5)]
    mirror = await make_mirror(registry.url, budget={"max_size": 3 * 1024 * KIB})
    for image in images:
        await pull(mirror, image)
    async with mirror.get("/status.json") as resp:
        evictions = (await resp.json())["evictions"]
    evicted = {e["digest"]: e for e in evictions}
    first = evicted[images[0].layer_digests[0]]  # the least recently used
    assert (first["bytes"], first["reason"]) == (700 * KIB, "size")
    assert evictions[0]["at"] >= evictions[-1]["at"]
    async with mirror.get("/") as resp:
        document = Texts(await resp.text())
    assert [row[1] for row in document.rows["evictions"][1:]] == [e["digest"] for e in evictions]


async def test_a_failing_upstream_shows_its_last_error(
    start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    mirror = start_mirror_process("--storage", str(tmp_path / "cache"), "--upstream", nowhere)
    code, _, _ = get(f"{mirror.url}/v2/team/app/manifests/v1")
    assert code == 502
    [upstream] = status_json(mirror)["upstreams"]
    assert upstream["healthy"] is False
    assert "is unreachable" in upstream["last_error"]
    assert upstream["last_error_at"] is not None
    _, _, page = get(mirror.url + "/")
    document = Texts(page.decode())
    [_, row] = document.rows["upstreams"]
    assert row[2] == "failing"
    assert upstream["last_error"] in row[3]


async def test_docker_hubs_quota_left_is_shown(
    fake_upstream: FakeUpstream, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    hub = fake_upstream
    hub.auth.scheme, hub.quota.remaining = "bearer", 100
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
    hub.manifests.put("library/alpine", "3.20", json.dumps(manifest).encode())
    config = Config(
        storage=StorageConfig(path=tmp_path / "cache"),
        upstreams=(UpstreamConfig(name="hub", url=hub.url, hosts=("docker.io",), default=True),),
    )
    mirror = await aiohttp_client(make_app(config))
    path = "/v2/library/alpine/manifests/3.20"
    async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as resp:
        assert resp.status == 200
    async with mirror.get("/status.json") as resp:
        [upstream] = (await resp.json())["upstreams"]
    assert (
        (upstream["quota_remaining"], upstream["quota_limit"])
        == (hub.quota.remaining, 100)
        == (99, 100)
    )
    async with mirror.get("/") as resp:
        assert Texts(await resp.text()).rows["upstreams"][1][4] == "99 of 100"


# --- who may see it ---------------------------------------------------------------------


def write_config(tmp_path: Path, registry_url: str, **more: object) -> Path:
    config = {
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": [{"name": "upstream", "url": registry_url}],
        **more,
    }
    path = tmp_path / "mirror.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


async def test_with_htpasswd_the_page_needs_a_login(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    config = write_config(tmp_path, registry.url, auth={"htpasswd": str(htpasswd)})
    mirror = start_mirror_process("--config", str(config))
    for path in ("/", "/status.json"):
        for authorization in (None, basic("alice", "wrong"), basic("mallory", "guess")):
            code, headers, body = get(mirror.url + path, authorization)
            assert code == 401, (path, authorization)
            assert headers["WWW-Authenticate"] == 'Basic realm="mirror"'
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        code, headers, body = get(mirror.url + path, basic("alice", USERS["alice"]))
        assert code == 200, body
    assert get(mirror.url + "/v2/")[0] == 200  # the public upstream needs no login


async def test_status_page_false_turns_it_off(
    registry: RegistryProcess, start_mirror_process: StartMirrorProcess, tmp_path: Path
) -> None:
    mirror = start_mirror_process(
        "--config", str(write_config(tmp_path, registry.url, status_page=False))
    )
    for path in ("/", "/status.json"):
        code, _, body = get(mirror.url + path)
        assert code == 404
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert get(mirror.url + "/metrics")[0] == 200


def test_status_page_must_be_true_or_false() -> None:
    assert config_from_dict({}).status_page is True
    assert config_from_dict({"status_page": False}).status_page is False
    values: list[object] = ["no", 0, None, []]
    for value in values:
        with pytest.raises(ConfigError, match=r"^status_page: must be true or false") as caught:
            config_from_dict({"status_page": value})
        assert caught.value.key == "status_page"


# --- hostile names, bounded memory, the last hour ---------------------------------------------

HOSTILE = [
    '<script>document.title="pwned"</script>',
    "<img src=x onerror=\"document.title='pwned'\">",
    '"><b id=injected>bold</b>',
    "&amp; &lt;",
]


def hostile_status() -> status.Status:
    record = Activity()
    for n, name in enumerate(HOSTILE):
        record.served("up</td><script>x</script>", name, 100 * (n + 1), pull=True)
        record.evicted(name, 10, "size")
    upstream = UpstreamHealth(
        name="<i>hub</i>",
        url='http://h/"><script>document.title="pwned"</script>',
        failing=True,
        last_error='answered <script>document.title="pwned"</script>',
        last_error_at=time.time(),
        quota_remaining=None,
        quota_limit=None,
    )
    return status.Status(
        version="<b>1</b>",
        started=record.started,
        uptime=record.uptime,
        processes=1,
        cache_used=0,
        cache_max=1,
        cache_blobs=0,
        since_start=Served(),
        last_hour=Served(),
        fetches_in_flight=0,
        upstreams=[upstream],
        by_pulls=record.top(10, "pulls"),
        by_bytes=record.top(10, "bytes"),
        evictions=record.evictions(),
    )


def test_hostile_names_are_text_in_the_browser(tmp_path: Path) -> None:
    """Repository names come from clients, errors from upstreams: in a real browser they
    show as the text they are, and none becomes markup or runs."""
    page = tmp_path / "status.html"
    page.write_text(status.render(hostile_status()), encoding="utf-8")
    dom = rendered_dom(page.as_uri())
    document = Texts(dom)
    assert document.scripts == 0
    assert document.handlers == 0
    assert "injected" not in document.by_id
    assert "<title>mirror status</title>" in dom  # no script renamed it
    names = [row[0] for row in document.rows["by-pulls"][1:]]
    assert sorted(names) == sorted(HOSTILE)
    assert {row[1] for row in document.rows["by-pulls"][1:]} == {"up</td><script>x</script>"}
    assert sorted(row[1] for row in document.rows["evictions"][1:]) == sorted(HOSTILE)
    [_, upstream] = document.rows["upstreams"]
    assert upstream[0] == "<i>hub</i>"
    assert upstream[3].endswith('answered <script>document.title="pwned"</script>')
    assert document.by_id["version"] == "<b>1</b>"


def test_repositories_tracked_stay_bounded_and_keep_the_most_used() -> None:
    record = Activity()
    for _ in range(50):
        record.served("hub", "library/alpine", 1000, pull=True)
    record.served("hub", "big/model", 10**9, pull=False)
    for n in range(10 * activity.TRACKED_REPOSITORIES):  # names without end, from clients
        record.served("hub", f"junk/n{n}", 1, pull=True)
        assert len(record.top(10**9, "pulls")) <= activity.TRACKED_REPOSITORIES
    assert record.top(1, "pulls")[0].name == "library/alpine"
    assert record.top(1, "bytes")[0].name == "big/model"


def test_the_last_hour_is_measured_from_the_sample_an_hour_ago() -> None:
    record = Activity()
    minute = 60.0
    for n in range(3 * activity.WINDOW_MINUTES):  # three hours of samples
        record.sample(Served(hits=n, misses=2 * n, bytes_from_cache=10 * n), n * minute)
    now = 3 * activity.WINDOW_MINUTES * minute
    total = Served(hits=1000, misses=2000, bytes_from_cache=10000)
    hour_ago = 2 * activity.WINDOW_MINUTES  # the first sample in the window
    assert record.last_hour(total, now) == Served(
        hits=1000 - hour_ago, misses=2000 - 2 * hour_ago, bytes_from_cache=10000 - 10 * hour_ago
    )
    young = Activity()
    young.sample(Served(), 0.0)
    assert young.last_hour(total, 5 * minute) == total
