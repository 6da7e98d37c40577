"""The `mirror` command: check-config, serve on the embedded default, python -m mirror,
du and gc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from containerd import ContainerdProcess
from fake_upstream import FakeUpstream
from podman import push_tar_image
from upstream_registry import (
    RegistryProcess,
    free_loopback_port,
    push_image,
    skopeo_copy_async,
)

from mirror.cli import main
from mirror.config import load_config
from mirror.reference import Digest, digest_of
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index

if TYPE_CHECKING:
    from conftest import MirrorProcess

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def test_check_config_ok(documented_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(documented_config)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams:\n  - {name: hub, url: 'registry-1.docker.io'}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "upstreams[0].url" in err[0]


def test_check_config_takes_the_client_timeouts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("limits: {header_timeout: 10s, keepalive_timeout: 2m}\n")
    assert main(["check-config", str(path)]) == 0
    limits = load_config(path).limits
    assert (limits.header_timeout, limits.keepalive_timeout) == (10, 120)
    for bad, key in (("header_timeout: 0", "limits.header_timeout"),
                     ("keepalive_timeout: soon", "limits.keepalive_timeout")):  # fmt: skip
        path.write_text(f"limits: {{{bad}}}\n")
        capsys.readouterr()
        assert main(["check-config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{key}:" in err[0], err


def test_serve_with_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-size", "huge"]) == 2
    assert "--max-size" in capsys.readouterr().err


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


def test_python_m_mirror_serves_on_the_embedded_default(tmp_path: Path) -> None:
    """No config file: ./data is created, Docker Hub is the upstream (never contacted here)."""
    port = free_loopback_port()
    command = [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, "mirror exited early"
                assert time.monotonic() < deadline, "mirror did not start"
                time.sleep(0.05)
        assert (tmp_path / "data" / "index.db").exists()
        assert (tmp_path / "data" / "tmp").is_dir()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0  # SIGTERM is a clean shutdown
    assert "https://registry-1.docker.io" in stderr


async def make_cache(root: Path, sizes: list[int]) -> list[Digest]:
    """A cache directory with blobs of these sizes, used in this order (oldest first)."""
    store = BlobStore(root)
    store.open()
    index = Index(root / "index.db")
    await index.open()
    digests = []
    for size in sizes:
        data = os.urandom(size)
        digests.append(digest_of(data))
        store.write(digests[-1], data)
        await index.add_blob(digests[-1], size)
    await index.close()
    return digests


async def test_du_prints_budget_use_and_oldest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await make_cache(tmp_path / "cache", [MIB, MIB])
    code = await asyncio.to_thread(
        main, ["du", "--storage", str(tmp_path / "cache"), "--max-size", "4MiB"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "budget      4.0 MiB; eviction from 90% down to 80%" in out
    assert "blobs       2 (2.0 MiB)" in out
    assert re.search(r"used        2\.\d MiB \(\d+\.\d% of the budget\)", out), out
    assert re.search(r"oldest use  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(0h00m ago\)", out), out


def test_du_without_a_cache_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["du", "--storage", str(tmp_path)]) == 2
    assert "no cache index at" in capsys.readouterr().err


async def test_gc_evicts_the_oldest_down_to_the_low_watermark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    oldest, *rest = await make_cache(root, [MIB, MIB, MIB])
    code = await asyncio.to_thread(main, ["gc", "--storage", str(root), "--max-size", "4MiB"])
    assert code == 0
    assert capsys.readouterr().out.startswith("evicted 1 blobs (1.0 MiB); ")
    assert not BlobStore(root).path(oldest).exists()
    assert all(BlobStore(root).path(d).exists() for d in rest)
    assert await asyncio.to_thread(main, ["gc", "--storage", str(root), "--max-size", "4MiB"]) == 0
    assert capsys.readouterr().out.startswith("evicted 0 blobs (0 B); ")


async def test_gc_says_why_a_pass_failed_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    oldest, *_ = await make_cache(root, [MIB, MIB, MIB])
    stuck = BlobStore(root).path(oldest)
    stuck.unlink()
    stuck.mkdir()  # what the pass must remove first cannot be: as on a failing disk
    code = await asyncio.to_thread(main, ["gc", "--storage", str(root), "--max-size", "2MiB"])
    err = capsys.readouterr().err.splitlines()
    failure = f"IsADirectoryError: [Errno 21] Is a directory: '{stuck}'"
    assert (code, err) == (1, [f"mirror: eviction pass failed: {failure}"])


def test_gc_skips_a_blob_another_process_is_reading(tmp_path: Path) -> None:
    """Holds are file locks, so they hold across processes: a worker, or `mirror serve`
    while `mirror gc` runs."""
    root = tmp_path / "cache"
    oldest, *rest = asyncio.run(make_cache(root, [MIB, MIB, MIB]))
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, str(root), str(oldest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "open\n"
        assert main(["gc", "--storage", str(root), "--max-size", "2MiB"]) == 0
        assert BlobStore(root).path(oldest).exists()  # LRU, but open elsewhere
        assert not any(BlobStore(root).path(d).exists() for d in rest)
    finally:
        reader.communicate("")
    assert main(["gc", "--storage", str(root), "--max-size", "1MiB"]) == 0
    assert not BlobStore(root).path(oldest).exists()  # released when the reader closed it


HOLD_OPEN = """
import sys
from pathlib import Path
from mirror.reference import parse_digest
from mirror.storage.blobs import BlobStore
file, size = BlobStore(Path(sys.argv[1])).open_blob(parse_digest(sys.argv[2]))
print("open", flush=True)
sys.stdin.read()
"""


async def test_a_second_server_on_the_same_storage_exits_2_and_touches_nothing(
    fake_upstream: FakeUpstream,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """It would have cleared the first one's temp files (a download in progress) and kept
    a budget of its own."""
    data = os.urandom(256 * 1024)
    digest = fake_upstream.blobs.put(data)
    fake_upstream.blobs.stall_after, fake_upstream.blobs.stalls = 64 * 1024, 1
    storage = tmp_path / "cache"
    args = ("--storage", str(storage), "--upstream", fake_upstream.url)
    first = await asyncio.to_thread(start_mirror_process, *args)

    async def get() -> bytes:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(f"{first.url}/v2/x/blobs/{digest}") as resp,
        ):
            return await resp.read()

    pending = asyncio.create_task(get())
    try:
        deadline = time.monotonic() + 10
        while sum(p.stat().st_size for p in (storage / "tmp").iterdir()) < 64 * 1024:
            assert time.monotonic() < deadline, "the download never got going"
            await asyncio.sleep(0.01)  # until it stalls, 64 KiB in
        downloading = list((storage / "tmp").iterdir())

        command = [sys.executable, "-m", "mirror", "serve", *args]
        command += ["--listen", f"127.0.0.1:{free_loopback_port()}"]
        second = await asyncio.create_subprocess_exec(*command, stderr=subprocess.PIPE)
        try:
            async with asyncio.timeout(15):
                _, stderr = await second.communicate()
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
        errors = [line for line in stderr.decode().splitlines() if "error" in line]
        assert errors == [
            f"mirror: config error: storage.path: {storage} is in use by another mirror serve"
            f" (pid {first.proc.pid})"
        ]
        assert second.returncode == 2
        assert list((storage / "tmp").iterdir()) == downloading  # not cleared
        for admin in ("du", "gc", "ls", "verify"):  # beside the server, as ever
            assert await asyncio.to_thread(main, [admin, "--storage", str(storage)]) == 0
    finally:
        fake_upstream.release.set()
    assert await pending == data
    assert first.proc.poll() is None


# --- configuration from the environment ------------------------------------------------------


def test_check_config_honours_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("storage: {max_size: 1GiB}\n")
    monkeypatch.setenv("MIRROR_STORAGE__MAX_SIZE", "huge")
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "mirror: config error: MIRROR_STORAGE__MAX_SIZE: invalid size 'huge':"
        " write e.g. 500MiB, 50GiB or 2TB"
    ]
    monkeypatch.setenv("MIRROR_STORAGE__MAX_SIZE", "2GiB")
    monkeypatch.setenv("MIRROR_WORKERS", "2")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path} with MIRROR_STORAGE__MAX_SIZE, MIRROR_WORKERS: OK (1 upstream(s))\n"
    )
    monkeypatch.setenv("MIRROR_CONFIG", str(path))  # the file, when none is given
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.startswith(f"{path} with MIRROR_STORAGE__MAX_SIZE, ")
    monkeypatch.delenv("MIRROR_CONFIG")
    monkeypatch.delenv("MIRROR_STORAGE__MAX_SIZE")
    monkeypatch.delenv("MIRROR_WORKERS")
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out == "embedded default: OK (1 upstream(s))\n"
    monkeypatch.setenv("MIRROR_WORKER", "2")  # a typo
    assert main(["check-config"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mirror: config error: MIRROR_WORKER: unknown variable: no config key has this name"
        " (did you mean MIRROR_WORKERS?)"
    ]
    assert main(["du", "--storage", str(tmp_path)]) == 2  # every command reads it
    assert "MIRROR_WORKER: unknown variable" in capsys.readouterr().err


def mirror_env(**variables: str) -> dict[str, str]:
    """An environment of these variables and PATH alone (nothing of this process's)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **variables}


@contextlib.contextmanager
def serve_in(
    env: dict[str, str], cwd: Path, url: str, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`mirror serve ARGS` (the console script) in `env`, until SIGTERM at the end; its
    output goes to cwd/serve.log."""
    with (cwd / "serve.log").open("ab") as log:
        proc = subprocess.Popen(
            ["mirror", "serve", *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (cwd / "serve.log").read_text()
                assert time.monotonic() < deadline, "mirror did not start"
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_serve_configured_by_the_environment_alone(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    """No flag, no file: the address, the cache, its budget, the upstream and the log format
    come from MIRROR_* variables; a skopeo pull through it, and containerd's through a
    hosts.toml naming it, reach the registry."""
    image = await push_image(registry.url, "env/app", "v1", [40 * 1024, 8 * 1024])
    other = await push_tar_image(registry.url, "env/other", "v1", [24 * 1024])
    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    port = free_loopback_port()
    storage = tmp_path / "env-cache"
    env = mirror_env(
        MIRROR_LISTEN=f"127.0.0.1:{port}",
        MIRROR_STORAGE__PATH=str(storage),
        MIRROR_STORAGE__MAX_SIZE="64MiB",
        MIRROR_UPSTREAM=registry.url,
        MIRROR_LOG__FORMAT="json",
    )
    bad = await asyncio.to_thread(
        subprocess.run, ["mirror", "serve"], env={**env, "MIRROR_WORKERS": "0"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.splitlines() == [
        "mirror: config error: MIRROR_WORKERS: must be a whole number >= 1, got 0"
    ]
    await registry.settle()
    registry.reset_counts()
    (hosts / "hosts.toml").write_text(
        f'[host."http://127.0.0.1:{port}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with (
        ContainerdProcess(tmp_path / "containerd") as containerd,
        serve_in(env, tmp_path, f"http://127.0.0.1:{port}"),
    ):
        await skopeo_copy_async(f"127.0.0.1:{port}/{image.reference}", tmp_path / "pulled")
        await containerd.pull_async(f"{registry.host}/{other.reference}", tmp_path / "certs.d")
        await registry.settle()
    assert registry.blob_gets() == len(image.blob_digests() | other.blob_digests())
    for digest in image.blob_digests() | other.blob_digests():
        assert BlobStore(storage).path(Digest(*digest.split(":", 1))).exists()
    assert not (tmp_path / "data").exists()  # not the default storage
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    start = next(line["message"] for line in lines if "listening" in line["message"])
    assert f"http://127.0.0.1:{port}, cache in {storage} (max {64 * MIB} bytes)" in start
    served = [(line["path"], line["status"]) for line in lines if "path" in line]
    assert (f"/v2/{image.name}/manifests/{image.tag}", 200) in served
    assert (f"/v2/{other.name}/manifests/{other.tag}", 200) in served  # containerd's HEAD


async def test_serve_takes_flags_over_the_environment_over_the_file(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    """Each level sets the address and the cache; the file also the upstream (one that is
    not there) and text logs, the environment the real registry and JSON logs."""
    image = await push_image(registry.url, "env/layered", "v1", [16 * 1024])
    file_port, env_port, flag_port = (free_loopback_port() for _ in range(3))
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{file_port}\n"
        f"storage: {{path: {tmp_path / 'file-cache'}}}\n"
        f"upstreams: [{{name: nowhere, url: 'http://127.0.0.1:{free_loopback_port()}'}}]\n"
        "log: {format: text}\n"
    )
    env = mirror_env(
        MIRROR_CONFIG=str(config),
        MIRROR_LISTEN=f"127.0.0.1:{env_port}",
        MIRROR_STORAGE__PATH=str(tmp_path / "env-cache"),
        MIRROR_UPSTREAM=registry.url,
        MIRROR_LOG__FORMAT="json",
    )
    flags = ("--listen", f"127.0.0.1:{flag_port}", "--storage", str(tmp_path / "flag-cache"))
    with serve_in(env, tmp_path, f"http://127.0.0.1:{flag_port}", *flags):
        for port in (file_port, env_port):
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
        await skopeo_copy_async(f"127.0.0.1:{flag_port}/{image.reference}", tmp_path / "pulled")
    assert (tmp_path / "flag-cache" / "index.db").exists()
    assert not (tmp_path / "env-cache").exists() and not (tmp_path / "file-cache").exists()
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    assert f"upstream 127.0.0.1: {registry.url}, auth anonymous" in lines[1]["message"]
