"""Protocol state machines wired together without a learner or a transport: the one router
the protocol-level tests share (one layer below `p2p_fl.driver`, which the engine tests run).

Training is the test's function; every `Send` goes through `deliver` (usually the message as
the addressee would get it from `wire.decode`); `Checkpoint` actions need no disk here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from p2p_fl.net import wire
from p2p_fl.protocols import Finish, Send, Train


@dataclasses.dataclass
class Trace:
    """What happened: each site's Finish, every training step and send in order, and the
    messages a site refused (with refusals counted rather than raised)."""

    finals: dict = dataclasses.field(default_factory=dict)
    trained: list = dataclasses.field(default_factory=list)  # (site, Train)
    sent: list = dataclasses.field(default_factory=list)  # (site, Send)
    refused: list = dataclasses.field(default_factory=list)  # (site, reason)


def route(sites: dict, train: Callable, deliver: Callable, *, silent=frozenset(), tick_s: float | None = None,
          heartbeats: bool = False, count_refusals: bool = False, max_steps: int = 100_000) -> Trace:
    """Runs `sites` (name -> protocol) until every site but the `silent` finished, or, without
    `tick_s`, until no action is left.

    Args:
        train: (site, Train) -> the trained weights.
        deliver: (sender, Send) -> the wire.Message the addressee gets.
        silent: sites that only exchange run keys (gossip-hello): they never train nor answer
            anything else, as a site that is down after the start.
        tick_s: when nothing is in flight, time moves on by this much and every site still
            running gets `on_tick` (after `on_peers` with everyone's progress, with
            `heartbeats`).
        count_refusals: a WireError is recorded in `Trace.refused` (as a node drops and
            counts it) instead of raised.
    """
    trace, now = Trace(), 0.0

    def heard(name, action):
        return name not in silent or (isinstance(action, Send) and action.type == wire.GOSSIP_HELLO)

    queue = [(n, a) for n, site in sites.items() for a in site.start(now) if heard(n, a)]
    for _ in range(max_steps):
        if len(trace.finals) >= len(sites) - len(silent):
            break
        if not queue:
            if tick_s is None:
                break
            now += tick_s
            progress = {n: s.progress for n, s in sites.items()}
            for n, site in sites.items():
                if n in trace.finals:
                    continue
                actions = site.on_peers(set(), set(), progress, now) if heartbeats else []
                queue += [(n, a) for a in actions + site.on_tick(now) if heard(n, a)]
            continue
        name, action = queue.pop(0)
        if isinstance(action, Train):
            trace.trained.append((name, action))
            queue += [(name, a) for a in sites[name].on_trained(action.round, train(name, action), now)
                      if heard(name, a)]
        elif isinstance(action, Send) and heard(action.to, action) and action.to not in trace.finals:
            trace.sent.append((name, action))
            try:
                replies = sites[action.to].on_message(deliver(name, action), now)
            except wire.WireError as err:
                if not count_refusals:
                    raise
                trace.refused.append((action.to, str(err)))
                continue
            queue += [(action.to, a) for a in replies if heard(action.to, a)]
        elif isinstance(action, Finish):
            trace.finals[name] = action
    else:
        raise AssertionError(f"the sites did not finish within {max_steps} steps")
    return trace
