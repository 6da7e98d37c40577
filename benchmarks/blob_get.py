"""One big blob GET: direct from the upstream, through the mirror cold, and warm.

A real docker-registry on loopback holds one random layer; `mirror serve` runs as a
subprocess in front of it with an empty cache. Each round measures a direct GET, a cold
GET through a fresh mirror cache, and a warm GET (the client hashes every byte and checks
the digest). Ratios are against the direct GET of the same round; the median round is
printed.

    python benchmarks/blob_get.py [--size-mib 256] [--rounds 3]

Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from upstream_registry import RegistryProcess, free_loopback_port, push_image

Timing = tuple[float, float]  # total seconds, seconds to the first body byte


async def get(url: str, digest: str) -> Timing:
    hasher = hashlib.sha256()
    began = time.perf_counter()
    first: float | None = None
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, response.status
        async for chunk in response.content.iter_chunked(1 << 20):
            first = first if first is not None else time.perf_counter() - began
            hasher.update(chunk)
    assert "sha256:" + hasher.hexdigest() == digest, "wrong bytes"
    return time.perf_counter() - began, first or 0.0


def start_mirror(storage: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    host = f"127.0.0.1:{free_loopback_port()}"
    command = [sys.executable, "-m", "mirror", "serve", "--listen", host]
    command += ["--storage", str(storage), "--upstream", upstream]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1).close()
            return proc, host
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("mirror did not start")


async def main(size_mib: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="blob-get-") as tmp:
        work = Path(tmp)
        with RegistryProcess(work / "upstream") as upstream:
            image = await push_image(upstream.url, "big/one", "v1", [size_mib << 20], tmp_dir=work)
            digest = image.layer_digests[0]
            path = f"/v2/big/one/blobs/{digest}"
            results: list[dict[str, Timing]] = []
            for n in range(rounds):
                storage = work / f"cache-{n}"
                proc, host = start_mirror(storage, upstream.url)
                try:
                    results.append(
                        {
                            "direct": await get(upstream.url + path, digest),
                            "mirror cold": await get(f"http://{host}{path}", digest),
                            "mirror warm": await get(f"http://{host}{path}", digest),
                        }
                    )
                finally:
                    proc.terminate()
                    proc.wait()
                    shutil.rmtree(storage, ignore_errors=True)
    print(f"{size_mib} MiB blob, {rounds} rounds, median of each figure")
    print("| GET | total s | first byte s | MB/s | x direct |")
    print("|---|---|---|---|---|")
    for name in results[0]:
        total = statistics.median(r[name][0] for r in results)
        first = statistics.median(r[name][1] for r in results)
        ratio = statistics.median(r[name][0] / r["direct"][0] for r in results)
        mbps = (size_mib << 20) / total / 1e6
        print(f"| {name} | {total:.3f} | {first:.4f} | {mbps:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.size_mib, args.rounds))
