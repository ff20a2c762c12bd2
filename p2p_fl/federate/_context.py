"""Unambiguous byte encoding of key-derivation contexts (HKDF info, AES-GCM associated data).

Every part is length-prefixed, so ("ab", "c") and ("a", "bc") never encode alike and no
federation or node name can be chosen to collide with another context.
"""

from __future__ import annotations

import struct


def pack(label: bytes, *parts: str | bytes | int) -> bytes:
    """`label` then each part as a 4-byte big-endian length and its bytes.

    Strings are UTF-8; integers (rounds) are 8-byte big-endian unsigned.
    """
    out = [struct.pack(">I", len(label)), label]
    for part in parts:
        if isinstance(part, bool):
            raise TypeError("a context part must be str, bytes or int, not bool")
        if isinstance(part, int):
            if not 0 <= part < 2**64:
                raise ValueError(f"a context integer must be in [0, 2**64), got {part}")
            raw = part.to_bytes(8, "big")
        elif isinstance(part, str):
            raw = part.encode("utf-8")
        elif isinstance(part, bytes):
            raw = part
        else:
            raise TypeError(f"a context part must be str, bytes or int, not {type(part).__name__}")
        out.append(struct.pack(">I", len(raw)))
        out.append(raw)
    return b"".join(out)


def unordered_pair(a: str, b: str) -> tuple[str, str]:
    """(a, b) sorted, so a key derived for the pair is the same on both sides."""
    if a == b:
        raise ValueError(f"a pair needs two different members, got {a!r} twice")
    return (a, b) if a < b else (b, a)


def members_part(members) -> bytes:
    """The sorted member list as one context part (names are length-prefixed inside)."""
    return pack(b"members", *sorted(members))
