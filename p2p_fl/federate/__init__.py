"""federate: pure math on weights (flat vectors, fixed point, masks, shares, mixing, secure sum).

Knows nothing about sockets, files or JAX: every function takes and returns arrays, bytes
and plain Python values.
"""

from p2p_fl.federate.fixed_point import (
    FixedPoint,
    check_capacity,
    choose_frac_bits,
    decode_sum,
    encode,
    error_bound,
    fixed_point_for,
    uint_dtype,
)
from p2p_fl.federate.flat import LeafSpec, Spec, flatten, unflatten, weighted_average
from p2p_fl.federate.masks import (
    RunKey,
    mask_sign,
    masked_contribution,
    modular_sum,
    pairwise_correction,
    pairwise_seed,
    prg,
    run_pair_secret,
    unmask,
    x25519_shared,
)
from p2p_fl.federate.mixing import (
    Adjacency,
    complete,
    edge_list,
    is_connected,
    metropolis_hastings_weights,
    random_regular,
    ring_neighbours,
    sample_count_weights,
)
from p2p_fl.federate.secure_sum import (
    AggregatorSession,
    Announcement,
    GroupRequest,
    JoinedRounds,
    MaskedReply,
    MemberSession,
    NeighbourhoodSum,
    Refusal,
    Release,
    check_request,
    default_threshold,
    join,
    max_dropped,
    mix_with_own,
    shared_secrets_with,
    start_sum,
)
from p2p_fl.federate.shares import (
    ShareDecryptionError,
    combine_seed,
    decrypt_share,
    encrypt_share,
    new_self_seed,
    seed_commitment,
    share_indices,
    share_key,
    split_seed,
)

__all__ = [
    # flat
    "LeafSpec",
    "Spec",
    "flatten",
    "unflatten",
    "weighted_average",
    # fixed_point
    "FixedPoint",
    "check_capacity",
    "choose_frac_bits",
    "decode_sum",
    "encode",
    "error_bound",
    "fixed_point_for",
    "uint_dtype",
    # masks
    "RunKey",
    "mask_sign",
    "masked_contribution",
    "modular_sum",
    "pairwise_correction",
    "pairwise_seed",
    "prg",
    "run_pair_secret",
    "unmask",
    "x25519_shared",
    # shares
    "ShareDecryptionError",
    "combine_seed",
    "decrypt_share",
    "encrypt_share",
    "new_self_seed",
    "seed_commitment",
    "share_indices",
    "share_key",
    "split_seed",
    # mixing
    "Adjacency",
    "complete",
    "edge_list",
    "is_connected",
    "metropolis_hastings_weights",
    "random_regular",
    "ring_neighbours",
    "sample_count_weights",
    # secure_sum
    "AggregatorSession",
    "Announcement",
    "GroupRequest",
    "JoinedRounds",
    "MaskedReply",
    "MemberSession",
    "NeighbourhoodSum",
    "Refusal",
    "Release",
    "check_request",
    "default_threshold",
    "join",
    "max_dropped",
    "mix_with_own",
    "shared_secrets_with",
    "start_sum",
]
