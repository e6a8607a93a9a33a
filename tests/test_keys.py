"""Keys made and revoked with `grifo keys` take effect on a running gateway within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from grifo.errors import AuthenticationError
from grifo.security.keys import KeyRing, Principal, generate_key, hash_key
from tests.support.fabric import CHAT, EMBED, Fabric, topology_yaml


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
    # Read the file only now: opening and closing it in the process that serves from it would
    # drop that process's SQLite locks (POSIX locks belong to the process, not the descriptor).
    assert key not in (state / "grifo.db").read_bytes().decode("latin-1")


def test_expired_keys_and_model_allow_lists(tmp_path: Path) -> None:
    secrets = {"old": generate_key(), "embedder": generate_key()}
    os.environ.update({f"GRIFO_TEST_{n.upper()}": k for n, k in secrets.items()})
    keys = (
        "keys:\n"
        "  - {id: old, tenant: demo-global, env: GRIFO_TEST_OLD, expires: '2000-01-01'}\n"
        "  - {id: embedder, tenant: demo-global, env: GRIFO_TEST_EMBEDDER, models: [fake-embed]}\n"
    )
    fab = Fabric.from_yaml(topology_yaml() + keys, tmp_path)
    try:
        url = f"{fab.url}/v1"
        old = openai.OpenAI(base_url=url, api_key=secrets["old"], max_retries=0)
        with pytest.raises(openai.AuthenticationError) as expired:
            old.models.list()
        assert expired.value.code == "expired_api_key"
        embedder = openai.OpenAI(base_url=url, api_key=secrets["embedder"], max_retries=0)
        assert [m.id for m in embedder.models.list()] == [EMBED]
        assert embedder.embeddings.create(model=EMBED, input="hi").data
        with pytest.raises(openai.PermissionDeniedError) as refused:
            embedder.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "x"}]
            )
        assert (refused.value.code, refused.value.param) == ("model_not_allowed", "model")
        old.close()
        embedder.close()
    finally:
        fab.close()


def test_a_key_made_with_an_expiry_stops_working(tmp_path: Path) -> None:
    ring = KeyRing()
    ring.add(hash_key("grf-a-past"), Principal("t", "a", None, expires_ms=1))
    ring.add(hash_key("grf-b-future"), Principal("t", "b", None, expires_ms=2**53))
    with pytest.raises(AuthenticationError, match="expired"):
        ring.authenticate(b"Bearer grf-a-past")
    assert ring.authenticate(b"Bearer grf-b-future").key_id == "b"


def test_a_key_checked_before_is_checked_again_after_the_keys_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ring remembers headers it has checked; a revoked key (the ring replaced without it)
    and an expiry passed since are refused all the same."""
    key, other = generate_key(), generate_key()
    header = f"Bearer {key}".encode()
    ring = KeyRing()
    ring.add(hash_key(key), Principal("acme", "k1", None, expires_ms=2_000_000_000_000))
    ring.add(hash_key(other), Principal("acme", "k2", None))
    assert ring.authenticate(header).key_id == "k1"
    assert ring.authenticate(bytes(header)).key_id == "k1"  # remembered
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # past k1's expiry
    with pytest.raises(AuthenticationError) as expired:
        ring.authenticate(header)
    assert expired.value.code == "expired_api_key"
    monkeypatch.undo()
    revoked = KeyRing()
    revoked.add(hash_key(other), Principal("acme", "k2", None))
    ring.replace(revoked)
    with pytest.raises(AuthenticationError, match="invalid API key"):
        ring.authenticate(header)
    assert ring.authenticate(f"Bearer {other}".encode()).key_id == "k2"
    with pytest.raises(AuthenticationError, match="invalid API key"):
        ring.authenticate(header)  # a refusal is not remembered as a success either
