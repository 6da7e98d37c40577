"""Memory held for failed logins: N failed logins, each from a new client address.

Drives `Gate.require` (the check every request for an `authenticated` upstream goes
through) with a user name the htpasswd file does not list, so no bcrypt runs; reports
the memory still allocated afterwards (tracemalloc, Python objects only) and the growth
of the process's resident set, for IPv4 addresses and for IPv6 ones in distinct /64s
and within one /64.

    python benchmarks/failed_logins.py [--logins 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

from mirror.access import Gate
from mirror.errors import LoginRequired, TooManyRequests

WRONG = "Basic " + "bm9ib2R5Ondyb25n"  # nobody:wrong


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096


async def fail(gate: Gate, addresses: Callable[[int], str], count: int) -> None:
    for n in range(count):
        with contextlib.suppress(LoginRequired, TooManyRequests):
            await gate.require(WRONG, addresses(n))


def ipv4(n: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + n))  # 10.0.0.0 onwards


def ipv6_networks(n: int) -> str:
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) + (n << 64) + 1))  # a /64 each


def ipv6_hosts(n: int) -> str:
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) + n + 1))  # all in one /64


async def measure(name: str, addresses: Callable[[int], str], count: int) -> None:
    """RSS in one run and tracemalloc in another (its own traces would count in RSS)."""
    gate = Gate({"alice": b"$2y$04$" + b"x" * 53})
    gc.collect()
    rss_before = rss_bytes()
    await fail(gate, addresses, count)
    gc.collect()
    rss_growth = rss_bytes() - rss_before
    del gate
    gate = Gate({"alice": b"$2y$04$" + b"x" * 53})
    gc.collect()
    tracemalloc.start()
    await fail(gate, addresses, count)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"{name:<16} {count} failed logins: {held / 1e6:6.1f} MB held (tracemalloc),"
        f" RSS +{rss_growth / 1e6:6.1f} MB"
    )


SOURCES: dict[str, Callable[[int], str]] = {
    "IPv4": ipv4,
    "IPv6, a /64 each": ipv6_networks,
    "IPv6, one /64": ipv6_hosts,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=100_000)
    parser.add_argument("--source", choices=SOURCES, help="only these addresses, in-process")
    args = parser.parse_args()
    if args.source:
        asyncio.run(measure(args.source, SOURCES[args.source], args.logins))
        return
    for source in SOURCES:  # each in a fresh process, so RSS starts from the same point
        command = [sys.executable, __file__, "--logins", str(args.logins), "--source", source]
        subprocess.run(command, check=True, timeout=600)


if __name__ == "__main__":
    main()
