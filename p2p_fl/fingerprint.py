"""What every site of a federation must agree on, hashed, so that a site whose topology
copy, data settings or p2p-fl version differs is found before round 0 and named with the
field, at every site, instead of training a different federation (or crashing in round 3).

Each field is hashed on its own: the short digests travel in every heartbeat, so a receiver
can name the fields that differ without anyone sending their settings in the clear. The
hash of all of them travels in every message's header (`wire`), which refuses a message
whose hash differs from the receiver's.

What must agree: the p2p-fl version; the federation, protocol and seed; the peers (names
and keys; not their addresses, which may differ from site to site); every [training], [ring], [gossip], [ensemble] and [privacy]
setting; the network settings every site's timing depends on; [data] image size,
channels and classes, and the model each site actually built (input shape, number of
classes, the names and shapes of its weights, and the package version of a model a site
installed); the [[events]]. What may differ: where a site's data comes from
(data.dataset, data.partition, data.train_images, data.test, how its file names say the patient:
data.patient_pattern, and how many rounds it scores on its test set: data.score_last_rounds) and how long it waits before
giving up (network.run_timeout_s, network.start_window_s: its own patience).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from p2p_fl import __version__
from p2p_fl.config import Topology

# Per-field digests are this many hex digits: a mismatch is found with certainty unless
# two settings collide (1 in 16M per field); the whole-set hash in the header has 64 bits.
FIELD_HEX = 6
HEADER_HEX = 16
SITE_LOCAL = frozenset({"data.dataset", "data.partition", "data.train_images", "data.test", "data.patient_pattern",
                        "data.score_last_rounds", "network.run_timeout_s", "network.start_window_s"})


@dataclass(frozen=True)
class Fingerprint:
    """(field name, digest) of everything the sites must agree on, in a fixed order."""

    fields: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        """The hash of every field (wire header `fp`)."""
        return hashlib.sha256("".join(d for _, d in self.fields).encode()).hexdigest()[:HEADER_HEX]

    @property
    def field_digests(self) -> str:
        """The per-field digests, concatenated (a heartbeat's meta.config)."""
        return "".join(d for _, d in self.fields)

    def differing(self, theirs: str | None) -> list[str]:
        """The fields whose digests differ from `theirs` (a peer's `field_digests`); the
        version alone when the two field lists cannot be compared (other p2p-fl versions)."""
        if not isinstance(theirs, str) or len(theirs) != FIELD_HEX * len(self.fields):
            return ["version"]
        return [name for i, (name, mine) in enumerate(self.fields)
                if theirs[i * FIELD_HEX:(i + 1) * FIELD_HEX] != mine]


def federation_fingerprint(topology: Topology, image_shape: tuple[int, ...], num_classes: int,
                           weight_spec=(), model_code: str = "p2p_fl") -> Fingerprint:
    """The fingerprint of `topology` for a site whose model takes `image_shape` images of
    `num_classes` classes, has the weights `weight_spec` ((name, dtype, shape), as built
    at this site) and comes from `model_code` (p2p_fl, or an installed package's version)."""
    values: list[tuple[str, object]] = [
        ("version", __version__),
        ("federation", topology.federation),
        ("protocol", topology.protocol),
        ("seed", topology.seed),
        # Who the peers are (names and keys), not where each site reaches them: a site may
        # reach another by another address (a VPN, a relay, NAT) or bind 0.0.0.0 itself.
        ("peers", [[p.name, p.public_key] for p in topology.peers]),
        ("model input", {"image_shape": list(image_shape), "num_classes": num_classes}),
        ("model code", model_code),
        ("model weights", [[n, str(d), list(s)] for n, d, s in weight_spec]),
        ("events", [dataclasses.asdict(e) for e in topology.events]),
    ]
    for section in ("training", "ring", "gossip", "ensemble", "privacy", "network", "data"):
        for key, value in dataclasses.asdict(getattr(topology, section)).items():
            name = f"{section}.{key}"
            if name not in SITE_LOCAL:
                values.append((name, value))
    return Fingerprint(tuple((name, _digest(value)) for name, value in values))


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FIELD_HEX]
