"""The `mirror` command: check-config, serve on the embedded default, python -m mirror."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from upstream_registry import free_loopback_port

from mirror.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config" / "mirror.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams:\n  - {name: hub, url: 'registry-1.docker.io'}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "upstreams[0].url" in err[0]


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
