"""A real Prometheus (Debian's `prometheus` package) on loopback, scraping given targets.

Nothing here is a fixture. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from server_process import ServerError, ServerProcess
from upstream_registry import free_loopback_port, require_tool

INSTALL_HINT = "apt-get install -y prometheus"


def require(tool: str) -> str:
    return require_tool(tool, INSTALL_HINT)


class PrometheusError(ServerError):
    pass


class PrometheusProcess(ServerProcess):
    """`prometheus` scraping `targets` (host:port) every second, with the given rules."""

    name = "prometheus"
    error = PrometheusError

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        super().__init__(workdir, workdir / "prometheus.log", free_loopback_port(), 30.0)
        self.binary = require("prometheus")
        self.targets = targets
        self.rule_files = rule_files
        self.config_path = workdir / "prometheus.yml"

    def _prepare(self) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": "mirror", "static_configs": [{"targets": self.targets}]}
            ],
        }
        self.config_path.write_text(json.dumps(config))  # YAML is a superset of JSON

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}",
        ]

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector, through the HTTP API."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])
