"""Long-term identities: one Curve25519 key pair per hospital, in ZeroMQ's certificate format.

The public key (40 Z85 characters) goes into the topology; the secret file stays at the
site, readable by its owner only (0600), written atomically so a crash never leaves half a
key. `zmq.auth.load_certificate` reads these files.
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85


class KeyFileError(ValueError):
    """A key file or key string that cannot be used; the message names it."""


# A key's name becomes part of file names: letters, digits, '-', '_', '.'; 1-64 characters,
# not starting with '.' (no hidden files, no '..', no path separators).
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def check_key_name(name: str) -> str:
    """`name` if it may name a key pair; KeyFileError saying why not otherwise."""
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise KeyFileError(f"--name {str(name)[:80]!r} must be 1-64 letters, digits, '-', '_' or '.', "
                           "not starting with '.'")
    return name


def is_public_key(text: str) -> bool:
    """True for a 40-character Z85 Curve25519 public key."""
    if not isinstance(text, str) or len(text) != 40:
        return False
    try:
        return len(z85.decode(text.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError):
        return False


def generate_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Writes NAME.key (public) and NAME.key_secret (0600) into `out_dir`.

    Refuses to overwrite an existing secret key: losing it locks a site out of its
    federation until every topology is updated.

    Returns:
        (public key path, secret key path).
    """
    check_key_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path, secret_path = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    if secret_path.exists() or secret_path.is_symlink():
        raise KeyFileError(f"{secret_path} already exists; refusing to overwrite a secret key")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # The secret first, and only where no file is: of two keygens at once, one wins and
    # the loser writes no public key either.
    _write_atomic(secret_path, _certificate(public, secret, name, stamp), 0o600, overwrite=False)
    _write_atomic(public_path, _certificate(public, None, name, stamp), 0o644)
    return public_path, secret_path


def load_secret_key(path: str | Path) -> tuple[str, str]:
    """(public, secret) Z85 keys from a NAME.key_secret file.

    Raises:
        KeyFileError: the file is missing, unreadable, holds no secret key, or is readable
            by others (a secret key anyone on the host can read is not secret).
    """
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file; create one with `p2p-fl keygen`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as err:
        raise KeyFileError(f"{path}: not a CURVE certificate ({err})") from None
    if not secret:  # before the mode: a public .key file is 0644 on purpose
        raise KeyFileError(f"{path}: holds no secret key: it is a public key; give the secret one "
                           f"`p2p-fl keygen` wrote beside it ({path.with_suffix('.key_secret').name})")
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"{path}: secret key is readable by group or others; run chmod 600 {path}")
    return public.decode("ascii"), secret.decode("ascii")


def load_public_key(path: str | Path) -> str:
    """The Z85 public key of a NAME.key file (what a site shares with the others)."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as err:
        raise KeyFileError(f"{path}: not a CURVE certificate ({err})") from None
    return public.decode("ascii")


def _certificate(public: bytes, secret: bytes | None, name: str, stamp: str) -> str:
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ****  Generated on {stamp} by p2p-fl keygen  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else
        "#   Share this public key with the federation; it goes into the topology file.",
        "",
        "metadata",
        f'    name = "{name}"',
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str, mode: int, *, overwrite: bool = True) -> None:
    """Writes `text` to `path` with exactly `mode`, atomically: a temporary file with a random
    name, created exclusively (O_EXCL, mode 0600 from the start), then renamed over `path`,
    or, without `overwrite`, hard-linked to it (which fails if `path` exists)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)  # exact, whatever the umask
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyFileError(f"{path} already exists; refusing to overwrite a secret key") from None
        except OSError:  # a file system without hard links: create it exclusively instead
            _write_exclusive(path, text, mode)
    finally:
        tmp.unlink(missing_ok=True)


def _write_exclusive(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a secret key") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())
