"""Shamir shares of self-mask seeds, encrypted end to end for their recipients.

Each member j draws a fresh 16-byte seed b_j per sum and splits it among the group with
threshold t (pycryptodome's Shamir over GF(2^128)); member k receives share number
index(k), its 1-based position in the sorted member list. The share travels through the
aggregator encrypted with AES-GCM under a key only j and k can derive (HKDF of their X25519
secret, with a label different from the mask seeds), and the associated data binds
federation, round, aggregator, sender, recipient and the member list: a share cannot be
replayed into another round, another aggregator's sum, another group or to another member.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2p_fl.federate import _context

SEED_BYTES = 16
SHARE_KEY_LABEL = b"p2p_fl/share-key/v1"
_SHARE_AD_LABEL = b"p2p_fl/share/v1"
_COMMITMENT_LABEL = b"p2p_fl/self-seed-commitment/v1"
_NONCE_BYTES = 12


class ShareDecryptionError(ValueError):
    """A share failed authentication: wrong key, round, aggregator, group, or tampered."""


def new_self_seed() -> bytes:
    """A fresh 16-byte self-mask seed from the operating system's CSPRNG (one per sum)."""
    return secrets.token_bytes(SEED_BYTES)


def share_indices(members: Iterable[str]) -> dict[str, int]:
    """Member name -> Shamir index (1-based position in the sorted member list)."""
    ordered = sorted(members)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"member list has duplicates: {ordered}")
    return {name: i for i, name in enumerate(ordered, start=1)}


def _check_threshold(threshold: int, n: int) -> None:
    # t = 1 would make every share equal to the seed itself.
    if not 2 <= threshold <= n:
        raise ValueError(f"threshold must be in [2, {n}] for {n} members, got {threshold}")


def split_seed(seed: bytes, members: Iterable[str], threshold: int) -> dict[str, bytes]:
    """Shamir-splits a 16-byte seed among `members`; any `threshold` of them rebuild it.

    Args:
        seed: 16 bytes.
        members: the group (the owner included: it keeps its own share).
        threshold: t, 2 <= t <= len(members).

    Returns:
        member -> its 16-byte share (its index is `share_indices(members)[member]`).
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a self-mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    indices = share_indices(members)
    _check_threshold(threshold, len(indices))
    by_index = dict(Shamir.split(threshold, len(indices), bytes(seed)))
    return {name: by_index[index] for name, index in indices.items()}


def combine_seed(shares: Mapping[str, bytes], members: Iterable[str], threshold: int) -> bytes:
    """Rebuilds a seed from at least `threshold` shares (uses the t lowest indices).

    With fewer than t shares nothing can be rebuilt: this raises rather than return the
    unrelated value that interpolating too few points would give.

    Args:
        shares: member -> the share it released.
        members: the group the seed was split among.
        threshold: t used by `split_seed`.

    Returns:
        The 16-byte seed (correct if the shares are; check with `seed_commitment`).
    """
    indices = share_indices(members)
    _check_threshold(threshold, len(indices))
    unknown = sorted(set(shares) - set(indices))
    if unknown:
        raise ValueError(f"shares from non-members {unknown}")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot rebuild a seed with threshold {threshold}")
    chosen = sorted((indices[name], bytes(share)) for name, share in shares.items())[:threshold]
    return Shamir.combine(chosen)


def seed_commitment(seed: bytes, *, federation: str, round: int, aggregator: str, owner: str) -> bytes:
    """SHA-256 commitment to a self-mask seed, sent with the masked reply.

    Lets the aggregator detect a wrongly rebuilt seed (a corrupt share) instead of
    producing a silently wrong sum. The seed is 128 random bits, so the hash reveals nothing.
    """
    return hashlib.sha256(_context.pack(_COMMITMENT_LABEL, federation, round, aggregator, owner,
                                        bytes(seed))).digest()


def share_key(shared_secret: bytes, *, federation: str, round: int, aggregator: str,
              a: str, b: str) -> bytes:
    """The 32-byte AES-GCM key for shares between members a and b in one sum.

    HKDF-SHA256 of their X25519 secret, with a label distinct from the mask seeds so the
    two keys are independent. Symmetric in (a, b).
    """
    if len(shared_secret) != 32:
        raise ValueError(f"shared secret must be 32 bytes, got {len(shared_secret)}")
    low, high = _context.unordered_pair(a, b)
    info = _context.pack(SHARE_KEY_LABEL, federation, round, aggregator, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def _associated_data(*, federation: str, round: int, aggregator: str, sender: str, recipient: str,
                     members: Iterable[str]) -> bytes:
    return _context.pack(_SHARE_AD_LABEL, federation, round, aggregator, sender, recipient,
                         _context.members_part(members))


def encrypt_share(share: bytes, *, key: bytes, federation: str, round: int, aggregator: str,
                  sender: str, recipient: str, members: Iterable[str]) -> bytes:
    """AES-GCM encryption of one share for its recipient.

    Args:
        share: the 16-byte Shamir share.
        key: `share_key` of sender and recipient for this sum.
        federation, round, aggregator: the sum this share belongs to.
        sender: the seed's owner; recipient: the member that will hold the share.
        members: the group, bound into the associated data.

    Returns:
        nonce (12 random bytes) || ciphertext || tag. The key serves both directions of the
        pair, so the nonce is random rather than a counter.
    """
    nonce = os.urandom(_NONCE_BYTES)
    ad = _associated_data(federation=federation, round=round, aggregator=aggregator,
                          sender=sender, recipient=recipient, members=members)
    return nonce + AESGCM(key).encrypt(nonce, bytes(share), ad)


def decrypt_share(blob: bytes, *, key: bytes, federation: str, round: int, aggregator: str,
                  sender: str, recipient: str, members: Iterable[str]) -> bytes:
    """Inverse of `encrypt_share`, with the same context.

    Raises:
        ShareDecryptionError: naming sender and recipient, if anything in the context
            differs from the encryption's or the bytes were altered.
    """
    blob = bytes(blob)
    if len(blob) < _NONCE_BYTES + 16:
        raise ShareDecryptionError(f"share from {sender!r} for {recipient!r} is too short "
                                   f"({len(blob)} bytes)")
    ad = _associated_data(federation=federation, round=round, aggregator=aggregator,
                          sender=sender, recipient=recipient, members=members)
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], ad)
    except InvalidTag:
        raise ShareDecryptionError(
            f"share from {sender!r} for {recipient!r} does not authenticate: wrong key, round, "
            "aggregator or group, or altered in transit"
        ) from None
