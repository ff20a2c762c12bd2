"""Pairwise and self masks for the secure neighbourhood sum (docs/architecture.md, Security;
docs/protocols.md, Gossip averaging with secure sums).

Member j of aggregator i's group G sends

    y_j = encode(w_ij * x_j) + PRG(b_j) + sum_{k in G, k != j} sign(j, k) * PRG(seed_jk)

modulo 2^bits, with sign(j, k) = +1 if j < k (string order) else -1. Pairwise terms cancel
in the sum over G; the self mask b_j is removed once its Shamir shares are rebuilt.

Sign convention for a dropped member d: survivor k's reply still carries its own term
sign(k, d) * PRG(seed_kd), which nothing cancels. `pairwise_correction` returns exactly
that term (summed over the dropped members), and `unmask` SUBTRACTS every correction.

Keys: the long-term CurveZMQ identities (Z85 text, as `zmq.curve_keypair()` makes them) are
X25519 keys, and each site also draws a fresh X25519 key per run (`RunKey`), sent to its
peers over the CURVE-authenticated connections. A pair's secret (`run_pair_secret`) mixes
both Diffie-Hellman results, so every seed and share key derived from it is bound to this
run: rerunning a federation with the same long-term keys never repeats a mask, and what an
aggregator collected in one run (a dropped member's corrections) is useless in the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from p2p_fl.federate import _context

PAIRWISE_SEED_LABEL = b"p2p_fl/pairwise-mask-seed/v1"
RUN_PAIR_SECRET_LABEL = b"p2p_fl/run-pair-secret/v1"
RUN_KEY_BYTES = 32
_PRG_KEY_LABEL = b"p2p_fl/prg-key/aes-128-ctr/v1"

# Keystream is produced by encrypting this block of zeros again and again: it stays in
# cache, so the only memory traffic is writing the keystream itself.
_CHUNK_BYTES = 1 << 18
_ZEROS = memoryview(bytes(_CHUNK_BYTES))
# Older `cryptography` releases want update_into's output buffer one block longer than
# the input; a 16-byte tail on every buffer we write into satisfies all versions.
_SLACK = 16


def _key_bytes(key: str | bytes, what: str) -> bytes:
    text = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(text) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 Curve25519 key, got {len(text)} characters")
    try:
        raw = z85.decode(text)
    except Exception as err:  # pyzmq raises KeyError/ValueError on characters outside Z85.
        raise ValueError(f"{what} is not valid Z85 text: {err!r}") from None
    return raw


def x25519_shared(secret_z85: str | bytes, peer_public_z85: str | bytes) -> bytes:
    """The 32-byte X25519 shared secret of our CURVE secret key and a peer's public key.

    Both sides get the same bytes: x25519_shared(sk_a, pk_b) == x25519_shared(sk_b, pk_a).

    Args:
        secret_z85: our secret key, 40 Z85 characters (str or bytes, as zmq returns it).
        peer_public_z85: the peer's public key from the topology, 40 Z85 characters.

    Returns:
        32 bytes; never use them directly as a key, derive with `pairwise_seed` or
        `shares.share_key`.

    Raises:
        ValueError: if a key does not parse, or the peer key is a low-order point (the
            shared secret would be all zeros).
    """
    secret = X25519PrivateKey.from_private_bytes(_key_bytes(secret_z85, "secret key"))
    public = X25519PublicKey.from_public_bytes(_key_bytes(peer_public_z85, "peer public key"))
    return secret.exchange(public)


class RunKey:
    """This site's X25519 key for one run: drawn from the OS CSPRNG, kept in the node's
    checkpoint (so a restarted node stays in its run), never derived from the topology.

    Args:
        private: the 32 raw private bytes of a key to take back (a checkpoint); None: a new one.
    """

    def __init__(self, private: bytes | None = None):
        self._key = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)
        self.public = self._key.public_key().public_bytes_raw()

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with a peer's run key. Raises ValueError for a malformed or low-order key."""
        if len(peer_public) != RUN_KEY_BYTES:
            raise ValueError(f"a run key is {RUN_KEY_BYTES} bytes, got {len(peer_public)}")
        return self._key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))


def run_pair_secret(long_term_shared: bytes, run_key: RunKey, peer_run_public: bytes) -> bytes:
    """The 32-byte secret of a pair of sites for one run: HKDF over both X25519 results.

    The long-term part authenticates (only the two topology keys can compute it); the run
    part makes it fresh. Symmetric: both sites get the same bytes.

    Raises:
        ValueError: the peer's run key is malformed or a low-order point.
    """
    if len(long_term_shared) != 32:
        raise ValueError(f"long-term shared secret must be 32 bytes, got {len(long_term_shared)}")
    ephemeral = run_key.exchange(peer_run_public)
    low, high = sorted([run_key.public, bytes(peer_run_public)])
    info = RUN_PAIR_SECRET_LABEL + low + high
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(long_term_shared + ephemeral)


def pairwise_seed(shared_secret: bytes, *, federation: str, round: int, aggregator: str,
                  a: str, b: str) -> bytes:
    """The 32-byte mask seed of members a and b for one sum: HKDF-SHA256 of their secret.

    The info binds federation, round, aggregating node and the unordered pair, each
    length-prefixed, so a seed is used for exactly one sum and is the same on both sides.

    Args:
        shared_secret: `x25519_shared` of the two members' keys.
        federation: federation id from the topology.
        round: gossip round (>= 0).
        aggregator: name of the node whose neighbourhood sum this is.
        a, b: the two members (either order).

    Returns:
        32 bytes, symmetric in (a, b).
    """
    if len(shared_secret) != 32:
        raise ValueError(f"shared secret must be 32 bytes, got {len(shared_secret)}")
    low, high = _context.unordered_pair(a, b)
    info = _context.pack(PAIRWISE_SEED_LABEL, federation, round, aggregator, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared_secret)


def _keystream(seed: bytes):
    if len(seed) < 16:
        raise ValueError(f"a mask seed needs at least 16 bytes, got {len(seed)}")
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=_PRG_KEY_LABEL).derive(bytes(seed))
    # A zero counter block is safe: each seed (pairwise: bound to one federation, round,
    # aggregator and pair; self: fresh random per sum) keys exactly one stream, so no
    # (key, nonce) pair ever encrypts two different things.
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def _mask_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"masks are uint32 or uint64, got {dt}")
    # Little-endian view of the keystream bytes, so every platform derives the same integers.
    return dt.newbyteorder("<")


def prg(seed: bytes, length: int, dtype=np.uint32) -> np.ndarray:
    """`length` uniformly random integers from AES-128-CTR keyed by `seed`.

    Args:
        seed: at least 16 bytes (a pairwise or self-mask seed); the AES key is derived from
            it with HKDF, so any seed length maps onto the cipher.
        length: number of elements.
        dtype: uint32 or uint64.

    Returns:
        A fresh read-write array viewing the keystream bytes directly (no copy).
    """
    dt = _mask_dtype(dtype)
    nbytes = int(length) * dt.itemsize
    buf = np.empty(nbytes + _SLACK, np.uint8)
    stream = _keystream(seed)
    out = memoryview(buf)
    for start in range(0, nbytes, _CHUNK_BYTES):
        size = min(_CHUNK_BYTES, nbytes - start)
        stream.update_into(_ZEROS[:size], out[start:start + size + _SLACK])
    return buf[:nbytes].view(dt)


def mask_sign(me: str, peer: str) -> int:
    """+1 if me < peer in string order, else -1: the sign of me's pairwise mask with peer."""
    if me == peer:
        raise ValueError(f"no pairwise mask of {me!r} with itself")
    return 1 if me < peer else -1


def _apply_streams(out: np.ndarray, streams: Iterable[tuple[bytes, int]]) -> np.ndarray:
    """out += sum(sign * PRG(seed)) modulo 2^bits, in place, chunk by chunk.

    Every stream's next chunk is added to the same slice of `out` while it is in cache, so
    memory sees one pass over `out` however many masks there are.
    """
    if out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("masks apply to a contiguous 1-D vector")
    dt = _mask_dtype(out.dtype)
    active = [(_keystream(seed), sign) for seed, sign in streams]
    if not active:
        return out
    scratch = np.empty(_CHUNK_BYTES + _SLACK, np.uint8)
    scratch_view = memoryview(scratch)
    step = _CHUNK_BYTES // dt.itemsize
    for start in range(0, out.size, step):
        part = out[start:start + step]
        size = part.size * dt.itemsize
        mask = scratch[:size].view(dt)
        for stream, sign in active:
            stream.update_into(_ZEROS[:size], scratch_view[:size + _SLACK])
            # Unsigned numpy arithmetic wraps: this is addition modulo 2^bits.
            if sign > 0:
                np.add(part, mask, out=part)
            else:
                np.subtract(part, mask, out=part)
    return out


def masked_contribution(encoded: np.ndarray, *, self_seed: bytes, pair_seeds: Mapping[str, bytes],
                        me: str) -> np.ndarray:
    """encoded + PRG(self_seed) + sum_k sign(me, k) * PRG(pair_seeds[k]) modulo 2^bits.

    Args:
        encoded: `fixed_point.encode` output (uint32 or uint64, 1-D); not modified.
        self_seed: this sum's fresh self-mask seed b_me.
        pair_seeds: other member -> `pairwise_seed` shared with it.
        me: this member's name (decides the signs).

    Returns:
        A fresh masked vector of the same dtype.
    """
    out = np.array(encoded, copy=True, order="C")
    if me in pair_seeds:
        raise ValueError(f"pair_seeds must not contain {me!r} itself")
    streams = [(self_seed, 1)] + [(pair_seeds[k], mask_sign(me, k)) for k in sorted(pair_seeds)]
    return _apply_streams(out, streams)


def pairwise_correction(length: int, *, pair_seeds_of_dropped: Mapping[str, bytes], me: str,
                        dtype=np.uint32) -> np.ndarray:
    """What survivor `me` releases so the aggregator can remove its masks with dropped members.

    Args:
        length: vector length.
        pair_seeds_of_dropped: dropped member d -> `pairwise_seed` of (me, d).
        me: the surviving member releasing the correction.
        dtype: uint32 or uint64, as the encoding.

    Returns:
        sum_d sign(me, d) * PRG(seed_{me,d}) modulo 2^bits: exactly the uncancelled terms in
        me's own masked reply. The aggregator subtracts it (see `unmask`).
    """
    _mask_dtype(dtype)
    out = np.zeros(length, np.dtype(dtype))
    streams = [(pair_seeds_of_dropped[d], mask_sign(me, d)) for d in sorted(pair_seeds_of_dropped)]
    return _apply_streams(out, streams)


def modular_sum(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """Sum of uint32/uint64 vectors modulo 2^bits (a fresh array)."""
    total = None
    for vector in vectors:
        if total is None:
            total = np.array(vector, copy=True, order="C")
            _mask_dtype(total.dtype)
        else:
            if vector.dtype != total.dtype or vector.shape != total.shape:
                raise ValueError(f"cannot add {vector.dtype}{vector.shape} to {total.dtype}{total.shape}")
            np.add(total, vector, out=total)
    if total is None:
        raise ValueError("modular_sum of no vectors")
    return total


def unmask(masked_sum: np.ndarray, self_seeds_of_survivors: Iterable[bytes],
           corrections: Iterable[np.ndarray]) -> np.ndarray:
    """The encoded sum of the survivors: masked_sum - sum PRG(b_j) - sum corrections.

    Args:
        masked_sum: `modular_sum` of the survivors' masked replies.
        self_seeds_of_survivors: the rebuilt self-mask seed b_j of every survivor.
        corrections: every survivor's `pairwise_correction` for the dropped members.

    Returns:
        A fresh vector: sum over survivors of encode(w_ij * x_j), modulo 2^bits.
    """
    out = np.array(masked_sum, copy=True, order="C")
    _apply_streams(out, [(seed, -1) for seed in self_seeds_of_survivors])
    for correction in corrections:
        if correction.dtype != out.dtype or correction.shape != out.shape:
            raise ValueError(f"correction {correction.dtype}{correction.shape} does not match the sum "
                             f"{out.dtype}{out.shape}")
        np.subtract(out, correction, out=out)
    return out
