"""A real containerd (Debian's 1.6) for tests, with its own root, state and socket, and
`ctr image pull` through a hosts.toml mirror.

Nothing here is a fixture. The CRI plugin is disabled; images unpack with the `native`
snapshotter (plain copies, no overlay mounts to clean up). `ctr` runs with HTTP(S)_PROXY
pointing at a dead loopback port, so if every mirror failed, its fallback to the real
registry could not leave the machine: it would fail at once instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from server_process import ServerError, ServerProcess
from upstream_registry import free_loopback_port, require_tool

INSTALL_HINT = "apt-get install -y containerd"
NAMESPACE = "mirror-test"


class ContainerdError(ServerError):
    pass


class ContainerdProcess(ServerProcess):
    name = "containerd"
    error = ContainerdError

    def __init__(self, workdir: Path) -> None:
        # containerd listens on a unix socket; the port only satisfies ServerProcess.
        super().__init__(workdir, workdir / "containerd.log", free_loopback_port(), 30.0)
        self.binary = require_tool("containerd", INSTALL_HINT)
        self.ctr = require_tool("ctr", INSTALL_HINT)
        self.address = workdir / "containerd.sock"
        self.config_path = workdir / "config.toml"

    def _prepare(self) -> None:
        self.config_path.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )

    def _command(self) -> list[str]:
        return [self.binary, "--config", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _ready(self) -> bool:
        if not self.address.exists():
            return False
        result = subprocess.run(
            [self.ctr, "--address", str(self.address), "version"],
            capture_output=True,
            timeout=10,
        )
        return result.returncode == 0

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        shutil.rmtree(self.workdir / "state", ignore_errors=True)

    def pull(self, image: str, hosts_dir: Path, timeout: float = 120) -> str:
        """`ctr image pull --hosts-dir D IMAGE`; its output. Raises on failure."""
        command = [
            self.ctr, "--address", str(self.address), "--namespace", NAMESPACE,
            "image", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", image,
        ]  # fmt: skip
        dead = f"http://127.0.0.1:{free_loopback_port()}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HTTP_PROXY": dead,
            "HTTPS_PROXY": dead,
            "NO_PROXY": "127.0.0.1,localhost,::1",
        }
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"ctr image pull {image} failed:\n{result.stderr}")
        return result.stdout

    async def pull_async(self, image: str, hosts_dir: Path) -> str:
        return await asyncio.to_thread(self.pull, image, hosts_dir)
