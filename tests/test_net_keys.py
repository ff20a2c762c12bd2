"""Identities: keygen writes usable CURVE key pairs, secret files 0600, never overwritten."""

import os
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


@pytest.mark.parametrize("name", ["", ".hidden", "..", "../escape", "a/b", "a b", "x" * 65, "caf\u00e9", "a\nb", "a\x00b"])
def test_keygen_refuses_a_name_that_is_not_a_plain_file_name(tmp_path, name):
    with pytest.raises(KeyFileError, match="must be 1-64 letters"):
        generate_keypair(tmp_path / "keys", name)
    assert not (tmp_path / "keys").exists() or not any((tmp_path / "keys").iterdir())
    assert {p.name for p in tmp_path.iterdir()} <= {"keys"}


@pytest.mark.parametrize("name", ["a", "hospital-a", "site_01.b", "x" * 64, "-a", "_"])
def test_keygen_accepts_plain_names(tmp_path, name):
    public_path, secret_path = generate_keypair(tmp_path, name)
    assert secret_path.name == f"{name}.key_secret" and load_secret_key(secret_path)[0] == load_public_key(public_path)


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a b"])
def test_keygen_command_refuses_a_bad_name_in_one_line_with_exit_2(tmp_path, name):
    proc = subprocess.run([sys.executable, "-m", "p2p_fl", "keygen", "--name", name, "--out", str(tmp_path / "k")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("p2p-fl: error: --name")
    assert not (tmp_path / "k").exists() and not (tmp_path / "escape.key_secret").exists()


def test_keygen_writes_through_a_fresh_temporary_file_never_a_planted_one(tmp_path):
    """The old writer used the predictable .NAME.key_secret.tmp without O_EXCL: a link planted
    there would have received the secret (or redirected the write)."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    for leaf in ("a.key_secret", "a.key"):
        (tmp_path / f".{leaf}.tmp").symlink_to(victim)
    public_path, secret_path = generate_keypair(tmp_path, "a")
    assert victim.read_text() == "untouched\n"
    assert not secret_path.is_symlink() and stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    # Nothing left behind but the pair and what was there.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.key.tmp", ".a.key_secret.tmp", "a.key", "a.key_secret",
                                                          "victim"]


def test_a_secret_key_is_never_written_over_an_existing_file_or_link(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "a.key_secret").symlink_to(target)  # dangling: exists() is False
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "a")
    assert not target.exists() and not (tmp_path / "a.key").exists()
    # The last step is a hard link, which fails if the name appeared meanwhile.
    from p2p_fl.net.keys import _write_atomic
    (tmp_path / "b.key_secret").write_text("first\n")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        _write_atomic(tmp_path / "b.key_secret", "second\n", 0o600, overwrite=False)
    assert (tmp_path / "b.key_secret").read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key_secret", "b.key_secret"]


def test_key_modes_are_exact_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        public_path, secret_path = generate_keypair(tmp_path, "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600 and stat.S_IMODE(public_path.stat().st_mode) == 0o644
