"""Keys made and revoked with `grifo keys` take effect on a running gateway within seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.support.fabric import CHAT, Fabric, topology_yaml


def _grifo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grifo", *args], capture_output=True, text=True)


def _eventually(check: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_create_use_revoke(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    state = tmp_path / "state"
    fab = Fabric.from_yaml(topology_yaml(), state)
    try:
        made = _grifo(
            "keys",
            "create",
            "--tenant",
            "demo-eu",
            "--config",
            str(config),
            "--state-dir",
            str(state),
        )
        assert made.returncode == 0, made.stderr
        key_id, key = made.stdout.split()
        assert key.startswith("grf-")
        assert key not in (state / "grifo.db").read_bytes().decode("latin-1")

        def works() -> bool:
            client = openai.OpenAI(base_url=f"{fab.url}/v1", api_key=key, max_retries=0)
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=CHAT, messages=[{"role": "user", "content": "new key"}]
                )
                return raw.headers["x-grifo-jurisdiction"] == "DE"  # the tenant's policy
            except openai.AuthenticationError:
                return False
            finally:
                client.close()

        assert _eventually(works), "a new key was not accepted"
        listed = _grifo("keys", "list", "--state-dir", str(state)).stdout
        assert key_id in listed
        assert key not in listed
        assert _grifo("keys", "revoke", key_id, "--state-dir", str(state)).returncode == 0
        assert _eventually(lambda: not works()), "a revoked key still works"
        assert _grifo("keys", "revoke", key_id, "--state-dir", str(state)).returncode == 1
        unknown = _grifo(
            "keys",
            "create",
            "--tenant",
            "nobody",
            "--config",
            str(config),
            "--state-dir",
            str(state),
        )
        assert unknown.returncode == 2
        assert "no tenant named 'nobody'" in unknown.stderr
    finally:
        fab.close()
