"""federate.shares: Shamir thresholds and end-to-end encrypted, context-bound shares."""

import itertools

import pytest
from Crypto.Protocol.SecretSharing import Shamir

from p2p_fl.federate import (
    ShareDecryptionError,
    combine_seed,
    decrypt_share,
    encrypt_share,
    new_self_seed,
    pairwise_seed,
    share_indices,
    share_key,
    split_seed,
)

MEMBERS = ["dave", "alice", "carol", "bob", "eve"]


def test_indices_follow_the_sorted_member_list():
    assert share_indices(MEMBERS) == {"alice": 1, "bob": 2, "carol": 3, "dave": 4, "eve": 5}
    with pytest.raises(ValueError, match="duplicates"):
        share_indices(["a", "a"])


def test_self_seeds_are_fresh_16_bytes():
    seeds = {new_self_seed() for _ in range(20)}
    assert len(seeds) == 20 and all(len(s) == 16 for s in seeds)


@pytest.mark.parametrize("n,t", [(2, 2), (3, 2), (4, 3), (5, 3), (6, 4)])
def test_any_t_shares_rebuild_and_t_minus_1_do_not(n, t):
    members = MEMBERS[:n] if n <= 5 else MEMBERS + ["frank"]
    seed = new_self_seed()
    shares = split_seed(seed, members, t)
    assert set(shares) == set(members) and all(len(s) == 16 for s in shares.values())
    for subset in itertools.combinations(members, t):
        assert combine_seed({m: shares[m] for m in subset}, members, t) == seed
    indices = share_indices(members)
    for subset in itertools.combinations(members, t - 1):
        with pytest.raises(ValueError, match=f"cannot rebuild a seed with threshold {t}"):
            combine_seed({m: shares[m] for m in subset}, members, t)
        # Interpolating too few points gives an unrelated value, not the seed.
        assert Shamir.combine([(indices[m], shares[m]) for m in subset]) != seed


def test_threshold_and_membership_are_checked():
    with pytest.raises(ValueError, match=r"threshold must be in \[2, 3\]"):
        split_seed(new_self_seed(), MEMBERS[:3], 1)
    with pytest.raises(ValueError, match=r"threshold must be in \[2, 3\]"):
        split_seed(new_self_seed(), MEMBERS[:3], 4)
    with pytest.raises(ValueError, match="16 bytes"):
        split_seed(b"x" * 32, MEMBERS[:3], 2)
    shares = split_seed(new_self_seed(), MEMBERS[:3], 2)
    with pytest.raises(ValueError, match="non-members"):
        combine_seed({"zed": shares["alice"], "carol": shares["carol"]}, MEMBERS[:3], 2)


CTX = dict(federation="fed", round=4, aggregator="agg")


def encrypt_for(key, **overrides):
    ctx = dict(CTX, sender="alice", recipient="bob", members=MEMBERS) | overrides
    return encrypt_share(b"s" * 16, key=key, **ctx)


def test_share_key_is_symmetric_and_independent_of_the_mask_seed():
    shared = bytes(range(32))
    key = share_key(shared, a="alice", b="bob", **CTX)
    assert key == share_key(shared, a="bob", b="alice", **CTX) and len(key) == 32
    assert key != pairwise_seed(shared, a="alice", b="bob", **CTX)
    assert key != share_key(shared, a="alice", b="bob", federation="fed", round=5, aggregator="agg")


def test_share_round_trip_and_every_context_field_is_bound():
    key = share_key(bytes(range(32)), a="alice", b="bob", **CTX)
    blob = encrypt_for(key)
    ctx = dict(CTX, sender="alice", recipient="bob", members=MEMBERS)
    assert decrypt_share(blob, key=key, **ctx) == b"s" * 16
    # The member order does not matter (the set is bound, sorted).
    assert decrypt_share(blob, key=key, **(ctx | {"members": sorted(MEMBERS)})) == b"s" * 16
    other_key = share_key(bytes(range(32)), a="alice", b="bob", federation="fed", round=5, aggregator="agg")
    wrong = [
        dict(key=key, **(ctx | {"round": 5})),  # replay into the next round
        dict(key=key, **(ctx | {"federation": "other"})),
        dict(key=key, **(ctx | {"aggregator": "carol"})),  # into another node's sum
        dict(key=key, **(ctx | {"recipient": "carol"})),  # to another member
        dict(key=key, **(ctx | {"sender": "carol"})),
        dict(key=key, **(ctx | {"members": MEMBERS[:4]})),  # into another group
        dict(key=other_key, **ctx),
    ]
    for kwargs in wrong:
        with pytest.raises(ShareDecryptionError, match="from '.*' for '.*' does not authenticate"):
            decrypt_share(blob, **kwargs)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ShareDecryptionError):
        decrypt_share(bytes(tampered), key=key, **ctx)
    with pytest.raises(ShareDecryptionError, match="too short"):
        decrypt_share(blob[:10], key=key, **ctx)


def test_a_share_encrypted_for_one_round_fails_under_the_next_rounds_key():
    shared = bytes(range(32))
    key4 = share_key(shared, a="alice", b="bob", **CTX)
    key5 = share_key(shared, a="alice", b="bob", federation="fed", round=5, aggregator="agg")
    blob = encrypt_for(key4)
    with pytest.raises(ShareDecryptionError):
        decrypt_share(blob, key=key5, **(CTX | {"round": 5}), sender="alice", recipient="bob",
                      members=MEMBERS)
