"""What deploy/ ships: the Dockerfile (no Docker engine here: its paths and its command),
compose, Kubernetes, systemd, and the client snippets, the latter used by real clients."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from containerd import ContainerdProcess
from podman import podman_image_digest, podman_rmi, push_tar_image, run_podman
from upstream_registry import RegistryProcess, free_loopback_port

from mirror.config import Config, environment_names, load_config

if TYPE_CHECKING:
    from conftest import MirrorProcess

    StartMirrorProcess = Callable[..., MirrorProcess]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each Dockerfile line, continuations joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_copies_what_exists_and_runs_non_root() -> None:
    steps = dockerfile()
    froms = [args for step, args in steps if step == "FROM"]
    assert froms[0].startswith("python:3.11-slim") and froms[-1] == "python:3.11-slim"
    for step, args in steps:
        if step == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), source
    final = steps[[i for i, (s, _) in enumerate(steps) if s == "FROM"][-1] :]
    assert ("USER", "mirror") in final
    assert ("VOLUME", "/var/lib/mirror") in final
    assert ("EXPOSE", "5000") in final
    assert any(s == "HEALTHCHECK" and "/healthz" in a for s, a in final)
    assert not any(s == "RUN" and "build-essential" in a for s, a in final)
    config = load_config(DEPLOY / "mirror.yaml")  # what COPY puts in /etc/mirror/mirror.yaml
    assert (str(config.storage.path), config.listen.port) == ("/var/lib/mirror", 5000)


def image_environment(tmp_path: Path) -> tuple[dict[str, str], int]:
    """The image's environment (ENV) on this machine, and the port its mirror listens on:
    MIRROR_CONFIG names a copy of the config COPY puts there, whose storage and port suit
    this machine."""
    steps = dict(dockerfile())
    assert steps["ENV"] == "MIRROR_CONFIG=/etc/mirror/mirror.yaml"
    port = free_loopback_port()
    shipped = (DEPLOY / "mirror.yaml").read_text()
    config = tmp_path / "mirror.yaml"
    config.write_text(
        shipped.replace("0.0.0.0:5000", f"127.0.0.1:{port}").replace(
            "/var/lib/mirror", str(tmp_path / "cache")
        )
    )
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MIRROR_CONFIG": str(config)}
    return env, port


def run_until_healthy(command: list[str], env: dict[str, str], port: int, log: Path) -> str:
    """Starts the command, waits (10 s at most) for /healthz, stops it; its output."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(log.read_text()) from None
                time.sleep(0.1)
        else:
            raise AssertionError(f"{command} did not start the mirror:\n{log.read_text()}")
    finally:
        proc.terminate()
        proc.wait(10)
    return log.read_text()


def test_dockerfile_command_starts_the_mirror_with_its_config(tmp_path: Path) -> None:
    """The CMD, run as the image would (with MIRROR_CONFIG from its ENV)."""
    env, port = image_environment(tmp_path)
    command = json.loads(dict(dockerfile())["CMD"])
    run_until_healthy(command, env, port, tmp_path / "mirror.log")
    assert (tmp_path / "cache" / "index.db").exists()


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_manifests() -> dict[str, dict[str, Any]]:
    """Each kind of deploy/kubernetes, with its (one) manifest."""
    kinds = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml_documents(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            kinds[doc["kind"]] = doc
    return kinds


def container_environment(container: dict[str, Any]) -> dict[str, str]:
    """A container's `env`, checked: only variables the mirror reads."""
    env = {entry["name"]: entry["value"] for entry in container.get("env", [])}
    assert env.keys() <= environment_names(), env.keys() - environment_names()
    return env


def service_links(service: dict[str, Any], address: str = "10.96.0.10") -> dict[str, str]:
    """What Kubernetes puts in the environment of every pod in the namespace of a Service
    (unless the pod sets enableServiceLinks: false)."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    links = {f"{name}_SERVICE_HOST": address}
    for i, port in enumerate(service["spec"]["ports"]):
        number, protocol = port["port"], port.get("protocol", "TCP")
        url = f"{protocol.lower()}://{address}:{number}"
        if i == 0:
            links |= {f"{name}_SERVICE_PORT": str(number), f"{name}_PORT": url}
        if "name" in port:
            links[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
        base = f"{name}_PORT_{number}_{protocol}"
        links |= {base: url, f"{base}_PROTO": protocol.lower(), f"{base}_PORT": str(number),
                  f"{base}_ADDR": address}  # fmt: skip
    return links


def test_kubernetes_manifests() -> None:
    kinds = kubernetes_manifests()
    kustomization = kinds.pop("Kustomization")
    assert all((DEPLOY / "kubernetes" / r).exists() for r in kustomization["resources"])
    image = {"MIRROR_CONFIG": str(DEPLOY / "mirror.yaml")}  # what the image's ENV names
    for kind in ("StatefulSet", "DaemonSet"):
        container = kinds[kind]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"]
        assert container["args"] == ["mirror", "serve"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        env = container_environment(container)
        config = load_config(None, image | env | service_links(kinds["Service"]))
        assert str(config.storage.path) == mounts["cache"] == "/var/lib/mirror"
        assert config.storage.max_size == 45 * 1024**3  # below the 50Gi volume
        assert (config.log.format, config.listen.port) == ("json", 5000)
        assert config.upstreams == Config().upstreams
    assert kinds["StatefulSet"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "cache"
    assert {"Service", "ServiceMonitor", "Namespace"} <= kinds.keys()


def test_the_statefulsets_container_starts_the_mirror(tmp_path: Path) -> None:
    """Its command in its environment, over the image's (with the storage path the cache
    volume is mounted on pointed here), beside the variables Kubernetes adds for the
    Service `mirror`, which the mirror must not take for mistakes."""
    kinds = kubernetes_manifests()
    container = kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    image, port = image_environment(tmp_path)
    env = {name: value.replace("/var/lib/mirror", str(tmp_path / "cache"))
           for name, value in container_environment(container).items()}  # fmt: skip
    links = service_links(kinds["Service"])
    assert {"MIRROR_SERVICE_HOST", "MIRROR_PORT", "MIRROR_PORT_5000_TCP_ADDR"} <= links.keys()
    log = run_until_healthy(container["args"], image | env | links, port, tmp_path / "m.log")
    start = next(json.loads(line) for line in log.splitlines() if "listening" in line)
    assert f"cache in {tmp_path / 'cache'} (max {45 * 1024**3} bytes)" in start["message"]


def test_compose_systemd_and_client_snippets() -> None:
    compose = yaml_documents(DEPLOY / "compose.yaml")[0]
    assert {"mirror", "prometheus", "grafana"} <= compose["services"].keys()
    env = compose["services"]["mirror"]["environment"]
    assert env.keys() <= environment_names(), env.keys() - environment_names()
    config = load_config(None, {"MIRROR_CONFIG": str(DEPLOY / "mirror.yaml")} | env)
    assert (config.storage.max_size, config.log.format) == (50 * 1024**3, "json")
    assert "mirror-cache:/var/lib/mirror" in compose["services"]["mirror"]["volumes"]
    assert str(config.storage.path) == "/var/lib/mirror"
    assert "mirror-cache" in compose["volumes"]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    unit = (DEPLOY / "systemd" / "mirror.service").read_text()
    for option in ("DynamicUser=yes", "StateDirectory=mirror", "ProtectSystem=strict",
                   "LimitNOFILE=65536"):  # fmt: skip
        assert re.search(rf"^{re.escape(option)}$", unit, re.MULTILINE), option
    daemon = json.loads((DEPLOY / "clients" / "daemon.json").read_text())
    assert daemon["registry-mirrors"] == ["http://mirror:5000"]
    for registry in ("docker.io", "ghcr.io"):
        hosts = tomllib.loads(
            (DEPLOY / "clients" / "certs.d" / registry / "hosts.toml").read_text()
        )
        assert hosts["host"]["http://mirror:5000"]["capabilities"] == ["pull", "resolve"]
    conf = tomllib.loads((DEPLOY / "clients" / "registries.conf").read_text())
    assert [r["location"] for r in conf["registry"]] == ["docker.io", "ghcr.io"]


async def test_podman_with_the_shipped_registries_conf(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    tmp_path: Path,
    podman_work: Path,
) -> None:
    """Docker Hub's entry of deploy/clients/registries.conf, pointed at this test's mirror
    (whose upstream, a real docker-registry, plays docker.io)."""
    image = await push_tar_image(registry.url, "library/busybox", "1")
    mirror = await asyncio.to_thread(
        start_mirror_process, "--storage", str(tmp_path / "cache"), "--upstream", registry.url
    )
    shipped = (DEPLOY / "clients" / "registries.conf").read_text()
    conf = shipped.replace("mirror:5000", mirror.host)
    await registry.settle()
    registry.reset_counts()
    ref = "docker.io/library/busybox:1"
    for attempt in range(2):
        result = await asyncio.to_thread(run_podman, podman_work, "pull", ref, registries_conf=conf)
        assert result.escapes == ()
        assert podman_image_digest(ref, podman_work) == image.manifest_digest
        await registry.settle()
        if attempt == 0:
            assert registry.blob_gets() == len(image.blob_digests())
            await asyncio.to_thread(podman_rmi, ref, podman_work)
            registry.reset_counts()
        else:
            assert registry.blob_gets() == 0


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProcess]:
    """containerd as root with its own config, root, state and socket; stopped after."""
    with ContainerdProcess(tmp_path / "containerd") as process:
        yield process


async def test_containerd_with_the_shipped_hosts_toml(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    containerd: ContainerdProcess,
    tmp_path: Path,
) -> None:
    """ctr pulls docker.io/library/busybox:1 through the mirror named by the shipped
    certs.d/docker.io/hosts.toml; the mirror's first request is containerd's HEAD of the
    tag with ?ns=docker.io, answered 200."""
    image = await push_tar_image(registry.url, "library/busybox", "1")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'cache'}}}\n"
        f"upstreams: [{{name: hub, url: '{registry.url}', hosts: [docker.io]}}]\n"
        "log: {format: json}\n"
    )
    mirror = await asyncio.to_thread(start_mirror_process, "--config", str(config))
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    shipped = (DEPLOY / "clients" / "certs.d" / "docker.io" / "hosts.toml").read_text()
    (hosts_dir / "docker.io" / "hosts.toml").write_text(
        shipped.replace("http://mirror:5000", mirror.url)
    )
    await registry.settle()
    registry.reset_counts()

    await containerd.pull_async("docker.io/library/busybox:1", hosts_dir)
    await registry.settle()
    assert registry.blob_gets() == len(image.blob_digests())
    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in mirror.log().splitlines()]
    # Past the readiness probe's GET /v2/ (containerd itself sends no ping).
    access = [e for e in lines if e["logger"] == "mirror.access" and e["path"] != "/v2/"]
    first = access[0]
    assert (first["method"], first["path"], first["status"]) == (
        "HEAD",
        "/v2/library/busybox/manifests/1",
        200,
    )
    assert "ns=docker.io" in first["query"]
    assert all("ns=docker.io" in entry["query"] for entry in access)
    assert {entry["status"] for entry in access} == {200}
