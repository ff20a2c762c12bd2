"""federate.masks: keys, seeds, the keystream, and exact cancellation of masks."""

import numpy as np
import pytest
import zmq
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from p2p_fl.federate import (
    mask_sign,
    masked_contribution,
    modular_sum,
    pairwise_correction,
    pairwise_seed,
    prg,
    unmask,
    x25519_shared,
)
from p2p_fl.federate import masks

CONTEXT = dict(federation="fed", round=7, aggregator="agg")


def seed_of(i: int) -> bytes:
    return bytes([i]) * 32


def test_x25519_shared_is_symmetric_and_matches_curvezmq_keys():
    pub_a, sec_a = zmq.curve_keypair()
    pub_b, sec_b = zmq.curve_keypair()
    shared = x25519_shared(sec_a, pub_b)
    assert len(shared) == 32
    assert shared == x25519_shared(sec_b, pub_a) == x25519_shared(sec_b.decode(), pub_a.decode())
    # ZeroMQ's public key is the X25519 public key of its secret key.
    derived = X25519PrivateKey.from_private_bytes(z85.decode(sec_a)).public_key().public_bytes_raw()
    assert z85.encode(derived) == pub_a == zmq.curve_public(sec_a)


def test_bad_keys_are_refused():
    pub, sec = zmq.curve_keypair()
    with pytest.raises(ValueError, match="peer public key must be a 40-character"):
        x25519_shared(sec, pub[:-1])
    with pytest.raises(ValueError, match="secret key is not valid Z85"):
        x25519_shared("~" * 40, pub)
    with pytest.raises(ValueError):  # The all-zero (low-order) point gives an all-zero secret.
        x25519_shared(sec, z85.encode(bytes(32)))


def test_pairwise_seed_is_symmetric_and_bound_to_every_context_field():
    shared = bytes(range(32))
    seed = pairwise_seed(shared, a="alice", b="bob", **CONTEXT)
    assert len(seed) == 32
    assert seed == pairwise_seed(shared, a="bob", b="alice", **CONTEXT)
    variants = [
        pairwise_seed(shared, federation="fed2", round=7, aggregator="agg", a="alice", b="bob"),
        pairwise_seed(shared, federation="fed", round=8, aggregator="agg", a="alice", b="bob"),
        pairwise_seed(shared, federation="fed", round=7, aggregator="bob", a="alice", b="bob"),
        pairwise_seed(shared, a="alice", b="carol", **CONTEXT),
        pairwise_seed(bytes(32), a="alice", b="bob", **CONTEXT),
    ]
    assert len({seed, *variants}) == 6
    # Length prefixes: moving a character from one field to the next changes the seed.
    assert (pairwise_seed(shared, federation="ab", round=1, aggregator="c", a="x", b="y")
            != pairwise_seed(shared, federation="a", round=1, aggregator="bc", a="x", b="y"))
    assert pairwise_seed(shared, a="ab", b="c", **CONTEXT) != pairwise_seed(shared, a="a", b="bc", **CONTEXT)
    with pytest.raises(ValueError, match="two different members"):
        pairwise_seed(shared, a="alice", b="alice", **CONTEXT)


def test_prg_is_aes128_ctr_under_an_hkdf_key():
    seed = seed_of(3)
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None,
               info=masks._PRG_KEY_LABEL).derive(seed)
    n = 3 * masks._CHUNK_BYTES // 4 + 5  # Crosses chunk boundaries, ends mid-chunk.
    expected = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(4 * n))
    out = prg(seed, n)
    assert out.dtype == np.uint32 and out.shape == (n,) and out.flags.writeable
    assert out.tobytes() == expected
    # The same bytes as uint64; a prefix is the prefix of the stream.
    assert prg(seed, n // 2, np.uint64).tobytes() == expected[: 8 * (n // 2)]
    np.testing.assert_array_equal(prg(seed, 10), out[:10])
    assert prg(seed, 0).shape == (0,)
    assert not np.array_equal(prg(seed_of(4), 10), out[:10])
    with pytest.raises(ValueError, match="at least 16 bytes"):
        prg(b"short", 4)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        prg(seed, 4, np.int32)


def test_mask_sign():
    assert mask_sign("a", "b") == 1 and mask_sign("b", "a") == -1
    with pytest.raises(ValueError):
        mask_sign("a", "a")


def pair_seeds_for(members):
    """Seeds as both ends of every pair would derive them (same value on each side)."""
    index = {m: i for i, m in enumerate(members)}
    return {m: {k: seed_of(10 * min(index[m], index[k]) + max(index[m], index[k]) + 1)
                for k in members if k != m} for m in members}


def test_masks_cancel_exactly_small_example():
    members = ["a", "b", "c"]
    seeds = pair_seeds_for(members)
    encoded = {m: np.array([i, 2**32 - 1 - i, 5], np.uint32) for i, m in enumerate(members)}
    masked = {m: masked_contribution(encoded[m], self_seed=seed_of(100 + i), pair_seeds=seeds[m], me=m)
              for i, m in enumerate(members)}
    # Each masked vector differs from its encoding; the sum minus the self masks is exact.
    assert all(not np.array_equal(masked[m], encoded[m]) for m in members)
    total = unmask(modular_sum(masked.values()), [seed_of(100), seed_of(101), seed_of(102)], [])
    # 0 + 1 + 2; (2^32 - 1) + (2^32 - 2) + (2^32 - 3) wraps to 2^32 - 6; 5 * 3.
    np.testing.assert_array_equal(total, np.array([3, 2**32 - 6, 15], np.uint32))


def test_pairwise_correction_sign_convention():
    # "b" drops after masking. Survivors a (< b) and c (> b) carry +PRG(s_ab) and -PRG(s_bc).
    members = ["a", "b", "c"]
    seeds = pair_seeds_for(members)
    n = 6
    ca = pairwise_correction(n, pair_seeds_of_dropped={"b": seeds["a"]["b"]}, me="a")
    cc = pairwise_correction(n, pair_seeds_of_dropped={"b": seeds["c"]["b"]}, me="c")
    np.testing.assert_array_equal(ca, prg(seeds["a"]["b"], n))
    np.testing.assert_array_equal(cc, (-prg(seeds["c"]["b"], n).astype(np.int64)) % 2**32)
    encoded = {"a": np.full(n, 3, np.uint32), "c": np.full(n, 2**32 - 1, np.uint32)}
    masked = [masked_contribution(encoded[m], self_seed=seed_of(50 + i), pair_seeds=seeds[m], me=m)
              for i, m in enumerate(["a", "c"])]
    total = unmask(modular_sum(masked), [seed_of(50), seed_of(51)], [ca, cc])
    np.testing.assert_array_equal(total, np.full(n, 2, np.uint32))  # 3 + (-1).


@settings(max_examples=40, deadline=None)
@given(
    n_members=st.integers(2, 8),
    length=st.integers(1, 70_000),
    dropped=st.integers(0, 6),
    bits=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_survivors_sum_is_exact_after_corrections(n_members, length, dropped, bits, data):
    dtype = np.uint32 if bits == 32 else np.uint64
    members = [f"m{i}" for i in range(n_members)]
    dropped_set = set(data.draw(st.sets(st.sampled_from(members), max_size=min(dropped, n_members - 1))))
    survivors = [m for m in members if m not in dropped_set]
    seeds = pair_seeds_for(members)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    encoded = {m: rng.integers(0, 2**bits, length, dtype=dtype, endpoint=False) for m in members}
    self_seeds = {m: rng.bytes(16) for m in members}  # Stand-ins: the test needs reproducible seeds.
    masked = {m: masked_contribution(encoded[m], self_seed=self_seeds[m], pair_seeds=seeds[m], me=m)
              for m in members}
    corrections = [pairwise_correction(length, pair_seeds_of_dropped={d: seeds[k][d] for d in dropped_set},
                                       me=k, dtype=dtype) for k in survivors] if dropped_set else []
    total = unmask(modular_sum(masked[m] for m in survivors), [self_seeds[m] for m in survivors],
                   corrections)
    np.testing.assert_array_equal(total, modular_sum(encoded[m] for m in survivors))


def test_masked_contribution_leaves_its_input_alone():
    encoded = np.arange(5, dtype=np.uint32)
    masked_contribution(encoded, self_seed=seed_of(1), pair_seeds={"b": seed_of(2)}, me="a")
    np.testing.assert_array_equal(encoded, np.arange(5))
    with pytest.raises(ValueError, match="must not contain 'a' itself"):
        masked_contribution(encoded, self_seed=seed_of(1), pair_seeds={"a": seed_of(2)}, me="a")
    with pytest.raises(ValueError, match="uint32 or uint64"):
        masked_contribution(encoded.astype(np.int32), self_seed=seed_of(1), pair_seeds={}, me="a")
