"""What deploy/ ships: the Dockerfile (no Docker engine here: its paths and its command),
compose, Kubernetes, systemd, and the client snippets, the latter used by real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml
from containerd import ContainerdProcess
from engines import S3Endpoint
from fake_upstream import FakeUpstream
from fleet import readyz
from podman import podman_image_digest, podman_rmi, push_tar_image, run_podman
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess
from upstream_registry import (
    RegistryProcess,
    dir_digests,
    free_loopback_port,
    push_image,
    require_tool,
    skopeo_copy_async,
)

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
            assert doc["apiVersion"] and doc["kind"], path
            # A Kustomization without metadata: kubectl 1.20 (Debian's) refuses it there.
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], path
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


# --------------------------------------------------------------------------- fleet mode

FLEET = DEPLOY / "fleet"
_INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_value(value: str) -> str:
    """A value of a compose file as compose passes it with no variable set: `${VAR:-x}` is
    x, `$$` a `$`."""
    return _INTERPOLATION.sub(lambda m: m.group(2), value).replace("$$", "$")


def fleet_compose() -> dict[str, Any]:
    return yaml_documents(DEPLOY / "compose-fleet.yaml")[0]


REPLICAS = ("mirror-1", "mirror-2", "mirror-3")


def fleet_environment(service: dict[str, Any]) -> dict[str, str]:
    return {name: compose_value(str(value)) for name, value in service["environment"].items()}


def test_compose_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = fleet_compose()
    services = compose["services"]
    assert {*REPLICAS, "balancer", "postgres", "minio", "minio-setup"} <= services.keys()
    assert services["postgres"]["image"] == "postgres:16"
    assert services["minio"]["command"][:2] == ["server", "/data"]
    sources = [v.split(":", 1)[0] for s in services.values() for v in s.get("volumes", [])]
    for source in sources:
        assert (DEPLOY / source).exists() if source[0] == "." else source in compose["volumes"]
    caches = set()
    secrets: set[str | None] = set()
    for name in REPLICAS:
        replica = services[name]
        assert replica["build"] == ".."
        assert "/readyz" in " ".join(replica["healthcheck"]["test"])
        assert replica["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "minio-setup": {"condition": "service_completed_successfully"},
        }
        mounts = {v.split(":")[1]: v.split(":")[0] for v in replica["volumes"]}
        assert mounts["/etc/mirror/mirror.yaml"] == "./fleet/mirror.yaml"  # the image's config
        caches.add(mounts["/var/lib/mirror"])
        env = fleet_environment(replica)
        config = load_config(None, {"MIRROR_CONFIG": str(FLEET / "mirror.yaml")} | env)
        assert str(config.storage.path) == "/var/lib/mirror"
        shared = config.shared
        assert shared is not None and shared.database_env is not None
        assert shared.peer_secret_env is not None
        assert env.keys() <= environment_names() | {
            shared.database_env,
            shared.peer_secret_env,
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        # Each replica is reached by its peers at its service's name, on the port it
        # listens on and nginx and Prometheus reach it at.
        assert shared.advertise_url == f"http://{name}:{config.listen.port}"
        assert config.listen.port == 5000
        # One fleet secret, the same for every replica (else peer requests are refused).
        monkeypatch.setenv(shared.peer_secret_env, env[shared.peer_secret_env])
        secrets.add(shared.fleet_secret())
        assert shared.lease_ttl == 30
        # The DSN names the compose database, with its user, password and database.
        monkeypatch.setenv(shared.database_env, env[shared.database_env])
        dsn = urllib.parse.urlsplit(shared.dsn())
        postgres = fleet_environment(services["postgres"])
        assert (dsn.hostname, dsn.port, dsn.username, dsn.password, dsn.path) == (
            "postgres",
            5432,
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            f"/{postgres['POSTGRES_DB']}",
        )
        assert urllib.parse.urlsplit(shared.endpoint_url or "").hostname == "minio"
        # The keys are those minio-setup gives the user it allows the bucket.
        setup = services["minio-setup"]
        script = compose_value(setup["command"][0])
        secret = fleet_environment(setup)["MINIO_MIRROR_SECRET"]
        assert env["AWS_SECRET_ACCESS_KEY"] == secret
        user = env["AWS_ACCESS_KEY_ID"]
        assert f'mc admin user add fleet {user} "$MINIO_MIRROR_SECRET"' in script
        assert f"mc admin policy attach fleet {shared.bucket} --user {user}" in script
        assert f"arn:aws:s3:::{shared.bucket}/*" in script
        assert not shared.redirect  # minio:9000 is a name only compose's network knows
    assert len(caches) == len(REPLICAS)  # a cache volume each
    [fleet_secret] = secrets
    assert fleet_secret and fleet_secret != env["AWS_SECRET_ACCESS_KEY"]
    balancer = services["balancer"]
    assert balancer["ports"] == ["5000:5000"]
    assert "./fleet/nginx.conf:/etc/nginx/nginx.conf:ro" in balancer["volumes"]
    nginx = (FLEET / "nginx.conf").read_text()
    assert re.findall(r"^\s*server ([\w.-]+:\d+)", nginx, re.MULTILINE) == [
        f"{r}:5000" for r in REPLICAS
    ]
    scraped = yaml.safe_load((FLEET / "prometheus.yml").read_text())
    targets = scraped["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{r}:5000" for r in REPLICAS]
    alerts = "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"
    assert alerts in services["prometheus"]["volumes"]


def fleet_kubernetes() -> dict[str, dict[str, Any]]:
    """Each kind of deploy/kubernetes/fleet, with its (one) manifest."""
    kinds = {}
    for path in sorted((DEPLOY / "kubernetes" / "fleet").glob("*.yaml")):
        for doc in yaml_documents(path):
            assert doc["apiVersion"] and doc["kind"], path
            # A Kustomization without metadata: kubectl 1.20 (Debian's) refuses it there.
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], path
            assert doc["kind"] not in kinds, path
            kinds[doc["kind"]] = doc
    return kinds


def quantity(text: str) -> int:
    """A Kubernetes quantity in binary units (50Gi), in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert match is not None, text
    return int(match[1]) << 10 * ("", "Ki", "Mi", "Gi", "Ti").index(match[2] or "")


def pod_environment(
    container: dict[str, Any], secrets: dict[tuple[str, str], str], pod_ip: str
) -> dict[str, str]:
    """A container's `env` as the kubelet makes it: each secretKeyRef's value from
    `secrets` ((name, key): value; an optional one absent is left out), `status.podIP` as
    `pod_ip`, and `$(NAME)` in a value replaced by a variable defined above it."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if (ref["name"], ref["key"]) not in secrets:
                assert ref.get("optional"), ref
                continue
            value = secrets[(ref["name"], ref["key"])]
        else:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", entry
            value = pod_ip
        env[entry["name"]] = value
    return env


def test_kubernetes_fleet_manifests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kinds = fleet_kubernetes()
    kustomization = kinds.pop("Kustomization")
    directory = DEPLOY / "kubernetes" / "fleet"
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert {m["metadata"].get("namespace", "mirror") for m in kinds.values()} == {"mirror"}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert kinds["Service"]["spec"]["selector"] == labels
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] == 2
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    service_labels = kinds["Service"]["metadata"]["labels"]
    assert kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"] == service_labels
    assert pod["spec"]["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["mirror", "serve"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]["ephemeral-storage"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # The ConfigMap on /etc/mirror, where the image's MIRROR_CONFIG looks.
    config_map = kinds["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mounts["config"] == "/etc/mirror"
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(config_map["data"]["mirror.yaml"])
    # From Secrets: the DSN the config names, the bucket's keys and the fleet secret; the
    # pod's IP from the downward API, and the advertised URL made of it.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
    values = {(ref["name"], ref["key"]): f"value-of-{ref['key']}" for ref in refs.values()}
    env = pod_environment(container, values, "10.244.1.7")
    config = load_config(None, {"MIRROR_CONFIG": str(config_file)} | env | service_links(
        kinds["Service"]))  # fmt: skip
    shared = config.shared
    assert shared is not None and shared.database_env is not None
    assert shared.peer_secret_env is not None
    assert not refs[shared.database_env].get("optional")
    assert not refs[shared.peer_secret_env].get("optional")
    assert refs["AWS_ACCESS_KEY_ID"]["optional"] and refs["AWS_SECRET_ACCESS_KEY"]["optional"]
    assert env.keys() - {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POD_IP"} <= (
        environment_names() | {shared.database_env, shared.peer_secret_env}
    )
    monkeypatch.setenv(shared.database_env, "postgresql://mirror@db:5432/mirror")
    assert shared.dsn() == "postgresql://mirror@db:5432/mirror"
    monkeypatch.setenv(shared.peer_secret_env, env[shared.peer_secret_env])
    assert shared.fleet_secret() == values[(refs[shared.peer_secret_env]["name"], "secret")]
    # Each pod is reached by its peers at its own IP, on the port it listens on.
    assert shared.advertise_url == f"http://10.244.1.7:{config.listen.port}"
    assert config.listen.port == container["ports"][0]["containerPort"]
    # Each Secret the Deployment reads, with its keys, is created by a command of the
    # kustomization's comment.
    comment = (directory / "kustomization.yaml").read_text().replace("\\\n#", "")
    for secret in {ref["name"] for ref in refs.values()}:
        [command] = re.findall(rf"kubectl -n mirror create secret generic {secret} .*", comment)
        keys = {ref["key"] for ref in refs.values() if ref["name"] == secret}
        assert keys == set(re.findall(r"--from-literal=(\w+)=", command)), command
    assert (shared.endpoint_url, shared.redirect) == (None, False)  # AWS S3
    # Each replica's own cache fits its volume.
    assert str(config.storage.path) == mounts["cache"] == "/var/lib/mirror"
    assert config.storage.max_size < quantity(volumes["cache"]["emptyDir"]["sizeLimit"])
    assert (config.log.format, config.listen.port) == ("json", 5000)


def test_kubectl_renders_the_fleet_kustomization() -> None:
    """kubectl's own kustomize (Debian's kubernetes-client is 1.20: no `metadata` in a
    Kustomization, which it refuses)."""
    kubectl = require_tool("kubectl", "apt-get install -y kubernetes-client")
    base = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert base.returncode == 0, base.stderr
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes" / "fleet")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in rendered) == sorted(
        kind for kind in fleet_kubernetes() if kind != "Kustomization"
    )
    assert {doc["metadata"].get("namespace", "mirror") for doc in rendered} == {"mirror"}


class Balancer(ServerProcess):
    """nginx with the shipped deploy/fleet/nginx.conf, its replicas and port swapped for
    loopback ones and its files kept under `workdir`."""

    name = "nginx"

    def __init__(self, workdir: Path, replicas: list[str]) -> None:
        super().__init__(workdir, workdir / "nginx.out", free_loopback_port(), 15.0)
        self.binary = require_nginx()
        self.replicas = replicas

    def _prepare(self) -> None:
        conf = (FLEET / "nginx.conf").read_text()
        servers = [f"server {r}:5000 " for r in REPLICAS]
        assert all(conf.count(s) == 1 for s in servers) and conf.count("listen 5000;") == 1
        for server, host in zip(servers, self.replicas, strict=True):
            conf = conf.replace(server, f"server {host} ")
        conf = conf.replace("listen 5000;", f"listen {self.host};")
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "".join(f"{kind}_temp_path {self.workdir / kind};\n" for kind in kinds)
        assert conf.count("http {\n") == 1
        conf = conf.replace("http {\n", "http {\n" + temp)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.workdir / "nginx.conf").write_text(f"{user}pid {self.workdir}/nginx.pid;\n{conf}")

    def _command(self) -> list[str]:
        error_log = str(self.workdir / "error.log")
        conf = str(self.workdir / "nginx.conf")
        return [self.binary, "-p", str(self.workdir), "-c", conf, "-e", error_log,
                "-g", "daemon off;"]  # fmt: skip

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def require_nginx() -> str:
    """nginx (in /usr/sbin, which a user's PATH may lack), or a skip (a failure on CI)."""
    if Path("/usr/sbin/nginx").exists():
        return "/usr/sbin/nginx"
    return require_tool("nginx", "apt-get install -y nginx")


def shipped_fleet_config(text: str, tmp_path: Path, n: int, upstream: str,
                         bucket: str, s3: S3Endpoint) -> Path:  # fmt: skip
    """A shipped replica config, on this machine: its cache under tmp_path, `upstream` for
    its upstreams, the bucket in `s3`. The rest (database_env, budgets, redirect) as
    shipped."""
    config = yaml.safe_load(text)
    config["storage"]["path"] = str(tmp_path / f"cache{n}")
    config["upstreams"] = [{"name": "up", "url": upstream}]
    config["shared"] |= {"bucket": bucket, "endpoint_url": s3.url, "region": s3.region}
    path = tmp_path / f"replica{n}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def replica_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: Path,
                        database_url: str, s3: S3Endpoint) -> None:  # fmt: skip
    """What a shipped replica is given, with this machine's values: the DSN in the variable
    its config names, the bucket's keys; the replicas started after inherit them (and
    nothing of the host's AWS setup)."""
    monkeypatch.setenv(yaml.safe_load(config.read_text())["shared"]["database_env"], database_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def compose_replica_environment(name: str, port: int) -> dict[str, str]:
    """The fleet part of compose's environment of replica `name`: the fleet secret as
    compose passes it, and the replica's advertise_url with its service's name and port
    replaced by loopback and `port`, where it listens here."""
    env = fleet_environment(fleet_compose()["services"][name])
    assert env["MIRROR_SHARED__ADVERTISE_URL"] == f"http://{name}:5000"
    return {"MIRROR_PEER_SECRET": env["MIRROR_PEER_SECRET"],
            "MIRROR_SHARED__ADVERTISE_URL": f"http://127.0.0.1:{port}"}  # fmt: skip


async def start_compose_replicas(
    start_mirror_process: StartMirrorProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    upstream: str,
    bucket: str,
    s3: S3Endpoint,
    database_url: str,
) -> list[MirrorProcess]:
    """The three replicas of compose-fleet.yaml, with deploy/fleet/mirror.yaml and each
    its environment, on loopback: sharing (database and bucket reached), each reached by
    the others at its advertise_url."""
    shipped = (FLEET / "mirror.yaml").read_text()
    replicas = []
    for n, name in enumerate(REPLICAS):
        config = shipped_fleet_config(shipped, tmp_path, n, upstream, bucket, s3)
        replica_environment(monkeypatch, tmp_path, config, database_url, s3)
        port = free_loopback_port()
        for variable, value in compose_replica_environment(name, port).items():
            monkeypatch.setenv(variable, value)
        start = start_mirror_process
        replicas.append(await asyncio.to_thread(start, "--config", str(config), port=port))
    for replica in replicas:
        await wait_sharing(replica)
    return replicas


async def wait_sharing(replica: MirrorProcess) -> None:
    """Until the replica reaches its database and bucket (10 s at most)."""
    deadline = time.monotonic() + 10
    while (status := await asyncio.to_thread(readyz, replica)).get("degraded"):
        assert time.monotonic() < deadline, f"{status}\n{replica.log()}"
        await asyncio.sleep(0.2)
    assert status == {"ready": True, "problems": []}


async def test_the_compose_fleet_behind_its_nginx(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Three replicas with deploy/fleet/mirror.yaml and compose's environment, behind
    nginx with deploy/fleet/nginx.conf: three clients pulling one cold image at once get
    it whole, and each blob leaves the upstream once (nginx routes a blob by its digest);
    with one replica gone, the image is still served, from the shared tier."""
    image = await push_image(registry.url, "fleet/app", "v1", [200 * 1024, 50 * 1024, 3 * 1024])
    replicas = await start_compose_replicas(start_mirror_process, monkeypatch, tmp_path,
                                            registry.url, s3_bucket_name, moto_s3,
                                            database_url)  # fmt: skip
    balancer = Balancer(tmp_path / "nginx", [r.host for r in replicas])
    await asyncio.to_thread(balancer.start)
    try:
        await registry.settle()
        registry.reset_counts()
        wanted = image.blob_digests() | {image.manifest_digest}
        pulls = [skopeo_copy_async(f"{balancer.host}/{image.reference}", tmp_path / f"pull{n}")
                 for n in range(3)]  # fmt: skip
        await asyncio.gather(*pulls)
        for n in range(3):
            assert dir_digests(tmp_path / f"pull{n}") == wanted
        await registry.settle()
        assert registry.blob_gets(image.name) == len(image.blob_digests()), (
            registry.requests(),
            [r.log()[-4000:] for r in replicas],
            (balancer.workdir / "error.log").read_text()[-2000:],
        )
        # The replicas share one fleet secret: none refuses another's peer request.
        assert sum(metric(r.url, "mirror_peer_requests_total", result="refused")
                   for r in replicas) == 0  # fmt: skip
        # Clients' address has no way to the peer route.
        peer = f"{balancer.url}/_mirror/peer/blobs/{image.layer_digests[0]}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, peer, timeout=5)
        assert refused.value.code == 404

        def uploaded() -> float:
            return sum(metric(r.url, "mirror_shared_uploads_total") for r in replicas)

        deadline = time.monotonic() + 20
        while uploaded() < len(wanted):  # every blob and the manifest in the bucket
            assert time.monotonic() < deadline, [r.log() for r in replicas]
            await asyncio.sleep(0.2)
        registry.reset_counts()
        for replica in replicas[:2]:  # one replica left, with a third of the blobs
            replica.stop()
        await skopeo_copy_async(f"{balancer.host}/{image.reference}", tmp_path / "after")
        assert dir_digests(tmp_path / "after") == wanted
        await registry.settle()
        assert registry.blob_gets(image.name) == 0
    finally:
        await asyncio.to_thread(balancer.stop)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` with `labels` that the mirror at `url` serves."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())  # fmt: skip


async def test_the_compose_fleet_replicas_stream_from_the_one_fetching(
    fake_upstream: FakeUpstream,
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The compose replicas asked for one cold blob at once, each directly (not through
    nginx, which would send them all to one): it leaves the upstream once, and the two
    replicas not fetching stream it from the one that is, at the advertise_url compose
    gives it, with compose's fleet secret."""
    blob = os.urandom(8 * 1024 * 1024)
    digest = fake_upstream.blobs.put(blob)
    fake_upstream.blobs.piece, fake_upstream.blobs.pause = 256 * 1024, 0.05  # about 1.6 s
    replicas = await start_compose_replicas(start_mirror_process, monkeypatch, tmp_path,
                                            fake_upstream.url, s3_bucket_name, moto_s3,
                                            database_url)  # fmt: skip

    async def pull(session: aiohttp.ClientSession, url: str) -> str:
        hashed = hashlib.sha256()
        async with session.get(f"{url}/v2/team/app/blobs/{digest}") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                hashed.update(chunk)
        return f"sha256:{hashed.hexdigest()}"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        pulled = await asyncio.gather(*(pull(session, r.url) for r in replicas))

    assert pulled == [digest] * 3
    assert fake_upstream.count("GET", f"/blobs/{digest}") == 1

    def total(name: str, **labels: str) -> float:
        return sum(metric(r.url, name, **labels) for r in replicas)

    assert total("mirror_fleet_leases_total", outcome="taken") >= 1
    assert total("mirror_fleet_leases_total", outcome="followed") >= 2
    assert total("mirror_peer_requests_total", result="served") >= 2
    assert total("mirror_peer_requests_total", result="refused") == 0
    assert total("mirror_peer_bytes_total") >= 2 * len(blob)


async def test_the_kubernetes_fleet_config_starts_a_sharing_replica(
    registry: RegistryProcess,
    start_mirror_process: StartMirrorProcess,
    moto_s3: S3Endpoint,
    s3_bucket_name: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The ConfigMap's config with the Deployment's variables (and the endpoint of an S3
    store here, where the shipped one means AWS; the pod's IP on loopback): the replica
    reaches both and is ready, and its peer route answers the fleet secret from the
    Secret, and only it."""
    kinds = fleet_kubernetes()
    text = kinds["ConfigMap"]["data"]["mirror.yaml"]
    config = shipped_fleet_config(text, tmp_path, 0, registry.url, s3_bucket_name, moto_s3)
    replica_environment(monkeypatch, tmp_path, config, database_url, moto_s3)
    for name, value in service_links(kinds["Service"]).items():
        monkeypatch.setenv(name, value)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    secret = "fleet-secret-from-the-secret"
    secrets = {("mirror-fleet-database", "url"): database_url,
               ("mirror-fleet-bucket", "access_key_id"): moto_s3.access_key,
               ("mirror-fleet-bucket", "secret_access_key"): moto_s3.secret_key,
               ("mirror-fleet-peer", "secret"): secret}  # fmt: skip
    env = pod_environment(container, secrets, "127.0.0.1")
    port = free_loopback_port()
    assert env["MIRROR_SHARED__ADVERTISE_URL"] == "http://127.0.0.1:5000"
    env["MIRROR_SHARED__ADVERTISE_URL"] = f"http://127.0.0.1:{port}"  # where it listens here
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    replica = await asyncio.to_thread(start_mirror_process, "--config", str(config), port=port)
    await wait_sharing(replica)
    image = await push_image(registry.url, "fleet/k8s", "v1", [10 * 1024])
    await skopeo_copy_async(f"{replica.host}/{image.reference}", tmp_path / "pulled")
    layer = sorted(image.blob_digests())[0]
    peer = f"{env['MIRROR_SHARED__ADVERTISE_URL']}/_mirror/peer/blobs/{layer}"

    def status(token: str) -> int:
        request = urllib.request.Request(peer, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert await asyncio.to_thread(status, secret) == 200
    assert await asyncio.to_thread(status, "wrong") == 401
