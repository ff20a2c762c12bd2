"""Plain gossip's mixer: each site sends its trained model to every live neighbour and mixes
what arrived by the round deadline, with its mixing row ("mean") or a robust rule ("median",
"trimmed-mean": every model counts once). A site that is behind rejoins with the models its
neighbours send it anyway, once two of them (one, for a site with a single neighbour) sent
models for the same later round; `on_leave = "keep-last"` keeps an absent or silent
neighbour's last model in the mean.
"""

from __future__ import annotations

from p2p_fl.federate import weighted_average
from p2p_fl.federate.robust import robust_aggregate
from p2p_fl.net import wire
from p2p_fl.protocols import gossip_messages as messages
from p2p_fl.protocols.actions import Action, Weights
from p2p_fl.protocols.gossip_mixer import Mixer


class PlainMixer(Mixer):
    def __init__(self, site):
        super().__init__(site)
        # Round -> sender -> model: this round, the next, and each sender's latest model for
        # a later round (what a site that is behind rejoins with).
        self._inbox: dict[int, dict[str, Weights]] = {}
        self._last_models: dict[str, Weights] = {}  # keep-last: each neighbour's last model
        # The round in which a missing neighbour was seen a round behind, and the round whose
        # deadline was moved on for it (once), as secure sums do.
        self._behind_in = -1
        self._extended_in = -1

    def on_message(self, msg: wire.Message, now: float) -> list[Action]:
        if msg.type == wire.GOSSIP_HELLO:
            raise wire.WireError(f"{msg.type} from {msg.sender}, who has no key of ours to share")
        if msg.type != wire.GOSSIP_MODEL:
            raise wire.WireError(f"unexpected {msg.type} message in plain gossip")
        return self._on_model(msg, now)

    def trained(self, weights: Weights) -> list[Action]:
        site = self.site
        return [messages.model(n, site.round, weights) for n in site.live(site.round)]

    def step(self, now: float) -> list[Action]:
        """Mixes the round once every live neighbour's model is here, or at the deadline; or
        rejoins a federation that is ahead (`_rejoin_round`)."""
        site = self.site
        if site.finished or site.training:
            return []
        far = self._rejoin_round()
        if far is not None:
            # The federation is at `far`: train it from our latest model (the skeleton's
            # `catch_up`), send it, and mix it with the models already here.
            self._inbox = {r: m for r, m in self._inbox.items() if r >= far}
            return site.catch_up(far)
        if not site.mixing:
            return []
        heard = dict(self._inbox.get(site.round, {}))
        missing = [n for n in site.live(site.round) if n not in heard]
        if missing and site.catching_up(missing):
            self._behind_in = site.round  # it may reach our round just before our deadline
        deadline = site.deadline + (site.round_timeout_s if self._extended_in == site.round else 0.0)
        if missing and now >= deadline and self._behind_in == site.round and self._extended_in != site.round:
            # A live neighbour a round behind (it waited for a site we did not) sends its
            # model when it gets here: once, wait one more round time for it rather than end
            # up a round ahead and, at the last round, alone (the secure sums' rule).
            self._extended_in = site.round
            return []
        if (missing and now < deadline) or (not heard and site.may_wait_for_the_dead(now)):
            return []
        if site.on_leave == "keep-last":  # the absent and the silent count with their last model
            heard.update({n: m for n, m in self._last_models.items() if n not in heard})
        names = sorted(heard)
        own = site.own if site.own is not None else site.start_model
        if own is None and not names:
            return []
        models = ([own] if own is not None else []) + [heard[n] for n in names]
        rows = ([site.me] if own is not None else []) + names
        if site.aggregation == "mean":
            mean = weighted_average(models, [site.row[n] for n in rows])
        else:  # every model counts once: a listed sample count must not buy a majority
            mean = robust_aggregate(models, site.aggregation, site.trim)
        self._inbox = {r: m for r, m in self._inbox.items() if r > site.round}
        return site.next_round(mean, {"members": len(site.neighbours), "survivors": len(names),
                                      "dropped": ",".join(n for n in site.neighbours if n not in heard)}, now)

    def finish(self, now: float) -> list[Action]:
        return self.site.end()  # nobody waits for us: no sum of theirs needs our release

    def snapshot(self) -> tuple[dict, Weights]:
        # Nothing of its own to keep; the fields a secure site fills, empty: one checkpoint
        # format for both.
        return {"joined": {}, "peer_run_keys": []}, {}

    def restore(self, state: dict, arrays: Weights) -> None:
        pass

    def _on_model(self, msg: wire.Message, now: float) -> list[Action]:
        site = self.site
        self.check_round(msg, site.round, site.rounds - 1)
        if msg.sender in self._inbox.get(msg.round, {}):
            raise wire.WireError(f"second model from {msg.sender} for round {msg.round}")
        # Beyond the next round keep only each sender's latest model: memory stays bounded
        # whatever a neighbour sends, and a site that is behind rejoins with the latest.
        if msg.round > site.round + 1:
            for r in [r for r, models in self._inbox.items() if r > site.round + 1 and msg.sender in models]:
                if r > msg.round:
                    return []
                del self._inbox[r][msg.sender]
        model = messages.parse_model(msg)
        self._inbox.setdefault(msg.round, {})[msg.sender] = model
        if site.on_leave == "keep-last":
            self._last_models[msg.sender] = dict(model)
        return self.step(now)

    def _rejoin_round(self) -> int | None:
        """The latest round, two or more ahead of ours, for which two neighbours (one, for a
        site with a single neighbour) sent models: the federation is there."""
        needed = min(2, len(self.site.neighbours))
        ahead = [r for r, models in self._inbox.items() if r >= self.site.round + 2 and len(models) >= needed]
        return max(ahead, default=None)
