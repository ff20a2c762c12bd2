"""Identities: keygen writes usable CURVE key pairs, secret files 0600, never overwritten."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from p2p_fl.net import KeyFileError, generate_keypair, is_public_key, load_public_key, load_secret_key

ROOT = Path(__file__).resolve().parent.parent


def test_keygen_writes_a_pair_zmq_can_load_with_a_private_secret_file(tmp_path):
    public_path, secret_path = generate_keypair(tmp_path, "hospital-a")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    public, secret = load_secret_key(secret_path)
    assert is_public_key(public) and load_public_key(public_path) == public
    z_public, z_secret = zmq.auth.load_certificate(secret_path)
    assert (z_public.decode(), z_secret.decode()) == (public, secret)
    assert zmq.auth.load_certificate(public_path)[1] is None  # the shareable file holds no secret


def test_keygen_never_overwrites_a_secret_key(tmp_path):
    _, secret_path = generate_keypair(tmp_path, "a")
    before = secret_path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "a")
    assert secret_path.read_bytes() == before


def test_a_secret_key_readable_by_others_is_refused(tmp_path):
    _, secret_path = generate_keypair(tmp_path, "a")
    secret_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_secret_key(secret_path)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.key_secret", "no such key file"),
    (lambda d: generate_keypair(d, "a")[0], "holds no secret key"),
])
def test_unusable_key_files_are_named(tmp_path, make, message):
    path = make(tmp_path)
    if path.exists():
        path.chmod(0o600)
    with pytest.raises(KeyFileError, match=message):
        load_secret_key(path)


@pytest.mark.parametrize("text", ["", "x" * 41, "short", "x" * 39 + " ", "x" * 39 + "~", "x" * 39 + "\u00e9"])
def test_malformed_public_keys_do_not_parse(text):
    assert not is_public_key(text)


def test_keygen_command_prints_the_line_for_the_topology(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "p2p_fl", "keygen", "--name", "hospital-a", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    public = load_public_key(tmp_path / "hospital-a.key")
    assert f'public_key = "{public}"' in proc.stdout


def node_config(tmp_path, keys: dict, insecure=False) -> Path:
    peers = "".join(f'[[peers]]\nname = "{n}"\naddress = "tcp://127.0.0.1:{5700 + i}"\n'
                    + (f'public_key = "{k}"\n' if k else "") for i, (n, k) in enumerate(keys.items()))
    path = tmp_path / "t.toml"
    path.write_text(f'federation = "f"\nprotocol = "cwt"\n[network]\ninsecure = {str(insecure).lower()}\n' + peers)
    return path


def run_node(*args):
    return subprocess.run([sys.executable, "-m", "p2p_fl", "node", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_node_refuses_a_topology_without_keys(tmp_path):
    config = node_config(tmp_path, {"a": "", "b": ""})
    proc = run_node("--config", str(config), "--name", "a", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "has no public_key" in proc.stderr


def test_node_refuses_a_secret_key_that_is_not_its_own(tmp_path):
    generate_keypair(tmp_path, "a")
    generate_keypair(tmp_path, "b")
    config = node_config(tmp_path, {"a": load_public_key(tmp_path / "a.key"), "b": load_public_key(tmp_path / "b.key")})
    proc = run_node("--config", str(config), "--name", "a", "--key", str(tmp_path / "b.key_secret"),
                    "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "is not the one" in proc.stderr
