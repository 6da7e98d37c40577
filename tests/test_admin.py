"""`mirror ls`, `verify`, `rm` and `warm` against a real storage dir filled by real pulls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from conftest import downloads_stored
from upstream_registry import (
    FOREIGN_LAYERS_ALLOWED,
    OCI_MANIFEST,
    PushedImage,
    RegistryProcess,
    push_image,
    push_index_with_foreign_digests,
    put_blob,
    sha256_digest,
)

from mirror.cli import main

if TYPE_CHECKING:
    from conftest import MirrorClient, MirrorProcess

    MakeMirror = Callable[..., Awaitable[MirrorClient]]

KIB = 1024
MIB = 1024 * KIB


async def pull(mirror: MirrorClient, image: PushedImage) -> None:
    headers = {"Accept": OCI_MANIFEST}
    async with mirror.get(f"/v2/{image.name}/manifests/{image.tag}", headers=headers) as resp:
        manifest = json.loads(await resp.read())
    for entry in [manifest["config"], *manifest["layers"]]:
        async with mirror.get(f"/v2/{image.name}/blobs/{entry['digest']}") as resp:
            assert resp.status == 200
            await resp.read()
    await downloads_stored(mirror)


def blob_file(storage: Path, digest: str) -> Path:
    hex_digest = digest.split(":", 1)[1]
    return storage / "blobs" / "sha256" / hex_digest[:2] / hex_digest


async def cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def test_ls_verify_and_rm(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = tmp_path / "cache"
    a = await push_image(registry.url, "adm/a", "v1", [64 * KIB])
    b = await push_image(registry.url, "adm/b", "v2", [32 * KIB, 32 * KIB])
    mirror = await make_mirror(registry.url, storage=storage)
    for image in (a, b):
        await pull(mirror, image)
    await asyncio.sleep(1.2)  # access times flushed
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {storage}}}\nupstreams: [{{name: upstream, url: '{registry.url}'}}]\n"
    )
    flags = ("--config", str(config))

    assert await cli("ls", *flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["UPSTREAM", "IMAGE", "DIGEST", "SIZE", "LAST"]
    assert [line.split()[1] for line in lines[1:]] == ["adm/a:v1", "adm/b:v2"]
    config_size = json.loads(a.manifest_bytes)["config"]["size"]
    size_a = len(a.manifest_bytes) + config_size + 64 * KIB
    assert f" {size_a / KIB:.1f} KiB " in lines[1]
    assert a.manifest_digest[:19] in lines[1]
    assert await cli("ls", "adm/b", *flags) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["adm/b:v2"]
    assert await cli("ls", "adm/none", *flags) == 1
    capsys.readouterr()

    # verify: a blob changed on disk is found, reported and removed; the index follows.
    victim = blob_file(storage, b.layer_digests[0])
    victim.write_bytes(b"rotten" + victim.read_bytes()[6:])
    assert await cli("verify", *flags) == 1
    out = capsys.readouterr().out
    assert f"corrupt, removed: {b.layer_digests[0]}" in out
    assert "verified 7 blobs: 1 corrupt" in out
    assert not victim.exists()
    assert await cli("verify", *flags) == 0
    assert "verified 6 blobs: 0 corrupt" in capsys.readouterr().out
    # A file lost with no server evicting it: its row goes, as a start would drop it.
    blob_file(storage, a.layer_digests[0]).unlink()
    assert await cli("verify", *flags) == 1
    out = capsys.readouterr().out
    assert f"missing, forgotten: {a.layer_digests[0]}" in out
    assert "verified 5 blobs: 0 corrupt, 1 missing\n" in out
    assert await cli("verify", *flags) == 0
    assert "verified 5 blobs: 0 corrupt\n" in capsys.readouterr().out
    await pull(mirror, b)  # the removed blob is simply fetched again
    assert victim.exists()

    # rm: the image's tag and blobs go; the other image is untouched.
    assert await cli("rm", f"{registry.host}/adm/a:v1", *flags) == 0
    assert "removed" in capsys.readouterr().out
    for digest in [a.manifest_digest, *a.blob_digests()]:
        assert not blob_file(storage, digest).exists()
    for digest in [b.manifest_digest, *b.blob_digests()]:
        assert blob_file(storage, digest).exists()
    assert await cli("rm", f"{registry.host}/adm/a:v1", *flags) == 1
    assert "not cached" in capsys.readouterr().out
    assert await cli("rm", "quay.io/adm/a:v1", *flags) == 2
    assert "no upstream of this mirror serves registry 'quay.io'" in capsys.readouterr().err
    assert await cli("ls", *flags) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["adm/b:v2"]


async def test_ls_and_rm_skip_digests_of_other_algorithms(
    make_mirror: MakeMirror,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An index naming an image with sha384 and md5 layers (foreign, never fetched), pinned."""
    storage = tmp_path / "cache"
    with RegistryProcess(tmp_path / "upstream", extra_config=FOREIGN_LAYERS_ALLOWED) as registry:
        odd = await push_index_with_foreign_digests(registry.url, "adm/odd", "v1")
        plain = await push_image(registry.url, "adm/plain", "v1", [16 * KIB])
        mirror = await make_mirror(registry.url, storage=storage)
        url = f"http://127.0.0.1:{mirror.server.port}"
        assert await cli("warm", "--mirror", url, f"{registry.host}/adm/odd:v1") == 0
        err = capsys.readouterr().err
        assert "skipped: unsupported digest algorithm 'sha384'" in err
        assert "skipped: unsupported digest algorithm 'md5'" in err
        await downloads_stored(mirror)
        await pull(mirror, plain)
        await mirror.close()
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {storage}}}\n"
        f"upstreams: [{{name: upstream, url: '{registry.url}'}}]\n"
        f"pins: ['{registry.host}/adm/odd:v1']\n"
    )
    flags = ("--config", str(config))

    assert await cli("ls", *flags) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["adm/odd:v1", "adm/plain:v1"]
    odd_bytes = len(odd.manifest_bytes) + sum(
        len(c.manifest_bytes) + sum(c.layer_sizes) + json.loads(c.manifest_bytes)["config"]["size"]
        for c in odd.children
    )
    assert f" {odd_bytes / KIB:.1f} KiB " in lines[1]
    for algorithm in ("sha384", "md5"):  # logged, once each
        assert caplog.text.count(f"names '{algorithm}:") == 1, caplog.text

    assert await cli("rm", f"{registry.host}/adm/plain:v1", *flags) == 0  # walks the pins
    assert "removed" in capsys.readouterr().out
    odd_files = [blob_file(storage, d) for d in [*odd.manifest_digests(), *odd.blob_digests()]]
    assert all(path.exists() for path in odd_files)
    assert await cli("gc", *flags) == 0
    assert "evicted" in capsys.readouterr().out

    config.write_text(config.read_text().replace("pins:", "#"))  # no longer pinned
    assert await cli("rm", f"{registry.host}/adm/odd:v1", *flags) == 0
    assert f"removed {registry.host}/adm/odd:v1: 4 blobs" in capsys.readouterr().out
    assert not any(path.exists() for path in odd_files)


async def test_warm_pulls_through_the_running_mirror(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = tmp_path / "cache"
    image = await push_image(registry.url, "adm/warm", "v1", [100 * KIB, 50 * KIB])
    mirror = await make_mirror(registry.url, storage=storage)
    url = f"http://127.0.0.1:{mirror.server.port}"
    code = await cli("warm", "--mirror", url, f"{registry.host}/adm/warm:v1")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warmed 1 of 1 images" in captured.out
    # Not a terminal: one line for the image, when done.
    assert captured.err == f"{registry.host}/adm/warm:v1  150.4 KiB in 3 blobs, 1 manifests\n"
    await downloads_stored(mirror)
    for digest in [image.manifest_digest, *image.blob_digests()]:
        assert blob_file(storage, digest).exists()
    await registry.settle()
    registry.reset_counts()
    await pull(mirror, image)
    await registry.settle()
    assert registry.blob_gets() == 0

    code = await cli("warm", "--mirror", url, f"{registry.host}/adm/missing:v1")
    assert code == 1
    assert "failed" in capsys.readouterr().err


async def test_warm_sends_a_bare_name_to_the_default_upstream(
    registry: RegistryProcess,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """`mirror serve --upstream URL`, as the quick start has it: `mirror warm library/x:1`
    goes to that upstream, not to Docker Hub's `ns`; a written host still routes by it."""
    storage = tmp_path / "cache"
    image = await push_image(registry.url, "library/warm", "v1", [32 * KIB])
    mirror = await asyncio.to_thread(
        start_mirror_process, "--storage", str(storage), "--upstream", registry.url
    )
    for name in ("library/warm:v1", f"{registry.host}/library/warm:v1"):
        warm = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mirror", "warm", "--mirror", mirror.url, name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(warm.communicate(), timeout=30)
        assert warm.returncode == 0, err.decode()
        assert "warmed 1 of 1 images" in out.decode()
    for digest in [image.manifest_digest, *image.blob_digests()]:
        assert blob_file(storage, digest).exists()
    await registry.settle()
    assert registry.blob_gets() == len(image.blob_digests())  # the second warm: all hits
    assert "ns=docker.io" not in mirror.log()


async def test_verify_beside_a_server_takes_no_evicted_blob_for_corrupt(
    registry: RegistryProcess,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """The server evicts blobs `mirror verify` listed and has not hashed yet. To hold the
    walk at that point, the blob it hashes first is made a FIFO holding the same bytes:
    verify waits in it until the evictions are done."""
    storage = tmp_path / "cache"
    victims = {sha256_digest(d): d for d in (os.urandom(256 * KIB) for _ in range(4))}
    first = os.urandom(KIB)  # sorts before every victim, so verify reads it first
    for _ in range(1000):
        if sha256_digest(first) < min(victims):
            break
        first = os.urandom(KIB)
    filler = os.urandom(512 * KIB)  # needs room: a victim, the least recently used, goes
    blobs = {**victims, sha256_digest(first): first, sha256_digest(filler): filler}
    async with aiohttp.ClientSession() as session:
        for digest, data in blobs.items():
            await put_blob(session, registry.url, "adm/v", digest, data)
    storage_flags = ("--storage", str(storage), "--max-size", "2MiB")
    mirror = await asyncio.to_thread(
        start_mirror_process, *storage_flags, "--upstream", registry.url
    )

    async def get(digest: str) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(f"{mirror.url}/v2/adm/v/blobs/{digest}") as resp,
        ):
            assert await resp.read() == blobs[digest]
        await until(lambda: blob_file(storage, digest).exists())

    for digest in [*victims, sha256_digest(first)]:  # the first read is the last used
        await get(digest)
    fifo = blob_file(storage, sha256_digest(first))
    fifo.unlink()
    os.mkfifo(fifo)

    verify = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "verify", *storage_flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    writer = -1
    try:
        # Opening a FIFO to write without waiting succeeds once a reader has it open.
        def reading() -> bool:
            nonlocal writer
            with contextlib.suppress(OSError):
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            return writer >= 0

        await until(reading)  # verify listed the blobs and waits for the first one's bytes
        await get(sha256_digest(filler))
        await until(lambda: not all(blob_file(storage, d).exists() for d in victims))
        os.set_blocking(writer, True)
        os.write(writer, first)
        os.close(writer)
        writer = -1
        async with asyncio.timeout(30):
            out, err = await verify.communicate()
    finally:
        if writer >= 0:
            os.close(writer)
        if verify.returncode is None:
            verify.kill()
            await verify.wait()
    evicted = sum(not blob_file(storage, d).exists() for d in victims)
    assert evicted >= 1
    assert "corrupt, removed" not in out.decode(), out.decode()
    assert verify.returncode == 0, out.decode() + err.decode()
    assert f"verified {5 - evicted} blobs: 0 corrupt; {evicted} evicted while checking" in (
        out.decode()
    )


async def until(ready: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"still not so after {seconds} s"
        await asyncio.sleep(0.02)


# --- warm's progress: redrawn on a terminal only ------------------------------------------------


async def warm_images(registry: RegistryProcess) -> list[tuple[str, PushedImage]]:
    """Two images of a few blobs each, by the names `mirror warm` is given."""
    images = [
        await push_image(registry.url, "adm/one", "v1", [256 * KIB, 128 * KIB]),
        await push_image(registry.url, "adm/two", "v1", [64 * KIB, 64 * KIB, 64 * KIB]),
    ]
    return [(f"{registry.host}/{image.reference}", image) for image in images]


def warmed_bytes(image: PushedImage) -> int:
    return sum(image.layer_sizes) + int(json.loads(image.manifest_bytes)["config"]["size"])


async def test_warm_into_a_pipe_writes_one_line_per_image(
    registry: RegistryProcess,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    """As a log or CI job receives it: no carriage return, no redraw."""
    images = await warm_images(registry)
    mirror = await asyncio.to_thread(
        start_mirror_process, "--storage", str(tmp_path / "cache"), "--upstream", registry.url
    )
    missing = f"{registry.host}/adm/none:v1"
    warm = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "warm", "--mirror", mirror.url,
        images[0][0], missing, images[1][0],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await warm.communicate()
    assert warm.returncode == 1
    assert "\r" not in err.decode() and "\x1b" not in err.decode()
    lines = err.decode().splitlines()
    assert len(lines) == 3, lines
    for line, (name, image) in zip((lines[0], lines[2]), images, strict=True):
        blobs = len(image.blob_digests())
        assert line == f"{name}  {warmed_bytes(image) / KIB:.1f} KiB in {blobs} blobs, 1 manifests"
    assert lines[1].startswith(f"{missing}: failed: manifest answered 404: ")
    assert out.decode().startswith("warmed 2 of 3 images, ")


def read_terminal(master: int, seconds: float) -> bytes:
    """What the programs on a pseudo-terminal write, until they have all closed it."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the terminal was still open after {seconds} s: {received!r}")


async def test_warm_on_a_terminal_redraws_its_line(
    registry: RegistryProcess,
    start_mirror_process: Callable[..., MirrorProcess],
    tmp_path: Path,
) -> None:
    images = await warm_images(registry)
    mirror = await asyncio.to_thread(
        start_mirror_process, "--storage", str(tmp_path / "cache"), "--upstream", registry.url
    )
    master, terminal = pty.openpty()
    try:
        warm = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mirror", "warm", "--mirror", mirror.url,
            *(name for name, _ in images),
            stdout=asyncio.subprocess.PIPE, stderr=terminal,
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        shown, (out, _) = await asyncio.gather(
            asyncio.to_thread(read_terminal, master, 60),
            asyncio.wait_for(warm.communicate(), 60),
        )
    finally:
        os.close(master)
        if terminal >= 0:
            os.close(terminal)
    assert warm.returncode == 0
    assert out.decode().startswith("warmed 2 of 2 images, ")
    text = shown.decode()
    full = "#" * 30
    for name, image in images:
        size = f"{warmed_bytes(image) / KIB:.1f} KiB"
        # Drawn as bytes arrived, then once more whole, and the line ended (the terminal
        # shows a newline as \r\n).
        assert text.count(f"\r{name}  [") >= 2, text
        assert f"\r{name}  [{full}] {size} / {size}\r\n" in text, text


# --- --json: the same facts, for scripts ---------------------------------------------------------


def cached_sizes(image: PushedImage) -> dict[str, int]:
    """Each blob the cache holds of an image (its manifest included), with its size."""
    manifest = json.loads(image.manifest_bytes)
    sizes = {image.manifest_digest: len(image.manifest_bytes)}
    return sizes | {e["digest"]: e["size"] for e in [manifest["config"], *manifest["layers"]]}


async def json_of(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> Any:
    """The one JSON document a command prints, checking its exit code."""
    assert await cli(*args, "--json") == code, args
    out, err = capsys.readouterr()
    assert err == "", err
    return json.loads(out)


async def test_admin_commands_answer_json(
    registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = tmp_path / "cache"
    a = await push_image(registry.url, "adm/a", "v1", [64 * KIB])
    b = await push_image(registry.url, "adm/b", "v2", [32 * KIB, 32 * KIB])
    mirror = await make_mirror(registry.url, storage=storage)
    url = f"http://127.0.0.1:{mirror.server.port}"
    names = [f"{registry.host}/{image.reference}" for image in (a, b)]
    began = time.time()

    # warm: a line per image, then the summary; nothing on stderr (not a terminal).
    missing = f"{registry.host}/adm/none:v1"
    assert await cli("warm", "--json", "--mirror", url, names[0], missing, names[1]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    first, failed, second, summary = (json.loads(line) for line in out.splitlines())
    for line, name, image in ((first, names[0], a), (second, names[1], b)):
        assert line == {"image": name, "ok": True, "bytes": warmed_bytes(image),
                        "blobs": len(image.blob_digests()), "manifests": 1, "skipped": [],
                        "seconds": line["seconds"]}  # fmt: skip
        assert 0 <= line["seconds"] < 30
    assert (failed["image"], failed["ok"]) == (missing, False)
    assert failed["error"].startswith("manifest answered 404: ")
    assert summary == {"warmed": 2, "images": 3, "seconds": summary["seconds"],
                       "bytes": warmed_bytes(a) + warmed_bytes(b)}  # fmt: skip
    await downloads_stored(mirror)
    await asyncio.sleep(1.2)  # access times flushed

    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"storage: {{path: {storage}, max_size: 1MiB}}\n"
        f"upstreams: [{{name: upstream, url: '{registry.url}'}}]\n"
    )
    flags = ("--config", str(config))
    sizes = cached_sizes(a) | cached_sizes(b)

    du = await json_of(capsys, 0, "du", *flags)
    assert du == {"storage": str(storage), "max_size": MIB, "high_watermark": 0.9,
                  "low_watermark": 0.8, "max_age": None, "used": du["used"], "blobs": 7,
                  "blob_bytes": sum(sizes.values()), "oldest_use": du["oldest_use"]}  # fmt: skip
    assert du["used"] >= du["blob_bytes"]
    assert began - 1 <= du["oldest_use"] <= time.time()
    assert await cli("du", *flags) == 0  # the text says the same
    text = capsys.readouterr().out
    assert f"blobs       7 ({du['blob_bytes'] / KIB:.1f} KiB)" in text
    assert f"used        {du['used'] / KIB:.1f} KiB" in text

    listed = await json_of(capsys, 0, "ls", *flags)
    assert [{k: v for k, v in row.items() if k != "last_use"} for row in listed] == [
        {"upstream": "upstream", "repository": image.name, "tag": image.tag,
         "digest": image.manifest_digest, "size": sum(cached_sizes(image).values())}
        for image in (a, b)
    ]  # fmt: skip
    assert all(began - 1 <= row["last_use"] <= time.time() for row in listed)
    assert await json_of(capsys, 1, "ls", "adm/none", *flags) == []
    assert len(await json_of(capsys, 0, "ls", "adm/b", *flags)) == 1

    assert await json_of(capsys, 0, "verify", *flags) == {
        "verified": 7, "corrupt": [], "missing": [], "evicted": 0
    }  # fmt: skip
    victim = blob_file(storage, b.layer_digests[0])
    victim.write_bytes(b"rotten" + victim.read_bytes()[6:])
    blob_file(storage, a.layer_digests[0]).unlink()
    assert await json_of(capsys, 1, "verify", *flags) == {
        "verified": 6, "corrupt": [b.layer_digests[0]], "missing": [a.layer_digests[0]],
        "evicted": 0,
    }  # fmt: skip

    kept = sorted(set(cached_sizes(a)) - {a.layer_digests[0]})
    assert await json_of(capsys, 0, "rm", names[0], *flags) == {
        "image": names[0], "cached": True, "blobs": kept, "freed": sum(sizes[d] for d in kept)
    }  # fmt: skip
    assert not any(blob_file(storage, d).exists() for d in kept)
    assert await json_of(capsys, 1, "rm", names[0], *flags) == {
        "image": names[0], "cached": False, "blobs": [], "freed": 0
    }  # fmt: skip

    left = await json_of(capsys, 0, "du", *flags)
    assert left["blobs"] == 3  # b's, without its corrupt layer
    # A budget the index alone overshoots: every blob goes.
    evicted = await json_of(capsys, 0, "gc", *flags, "--max-size", "16KiB")
    assert evicted == {"evicted_blobs": 3, "evicted_bytes": left["blob_bytes"],
                       "used": evicted["used"], "max_size": 16 * KIB}  # fmt: skip
    after = await json_of(capsys, 0, "du", *flags)
    assert (after["blobs"], after["blob_bytes"]) == (0, 0)
    assert 0 < evicted["used"] < left["used"]
