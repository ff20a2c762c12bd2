"""What one site learns in secure gossip never isolates another site's model: every shipped
secure-gossip topology run as state machines (every message through wire.encode/decode),
with and without a member that drops out, and each site's unmasked sums checked with a rank
test. Catching up used to hand a site its neighbours' mixes on demand: with its own sum that
solved for every model of a 4-site ring (see the last test).
"""

import dataclasses
from pathlib import Path

import pytest
from routing import route
from test_protocol_gossip import model, over_the_wire, secure_setups

from p2p_fl.config import ConfigError, gossip_graph, load_topology, parse_topology
from p2p_fl.federate import Slices, complete, isolated_sites, ring_neighbours
from p2p_fl.protocols import GossipProtocol
from p2p_fl.protocols.gossip import mixing_weights
from p2p_fl.protocols.gossip_secure import SecureMixer

TOPOLOGIES = sorted(p for p in (Path(__file__).resolve().parent.parent / "topologies").glob("*.toml")
                    if (t := load_topology(p)).protocol == "gossip" and t.gossip.secure)


class RecordingMixer(SecureMixer):
    """An honest site's secure mixer that writes down every sum it unmasks: its whole view of the others."""

    def _mix(self, result, failure, now):
        if result is not None:
            weights = self._aggregation.session.weights
            self.site.views.setdefault(self.site.round, []).append({s: weights[s] for s in result.survivors})
            if self.setup.slices is not None:  # chunked: this mix goes to every neighbour
                self.site.published[self.site.round] = {self.site.me: self.site.row[self.site.me],
                                                        **{s: weights[s] for s in result.survivors}}
        return super()._mix(result, failure, now)


class Recording(GossipProtocol):
    secure_mixer = RecordingMixer


def run_views(graph, weights, rounds, silent=(), chunked=False):
    setups = secure_setups(graph)
    if chunked:
        slices = Slices.of(graph, 4)  # the test model: w (3) and b (1)
        setups = {n: dataclasses.replace(s, slices=slices) for n, s in setups.items()}
    sites = {n: Recording(n, graph, weights, rounds, round_timeout_s=10.0, secure=setups[n]) for n in graph}
    for site in sites.values():
        site.views, site.published = {}, {}
    # A late reply is refused and counted, as by a node.
    route(sites, lambda name, step: model(float(sorted(graph).index(name) + step.round)), over_the_wire,
          silent=frozenset(silent), tick_s=1.0, count_refusals=True)
    return sites


@pytest.mark.parametrize("dropout", [False, True], ids=["all", "one-drops"])
@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_no_site_s_sums_isolate_another_site_s_model(path, dropout):
    topology = load_topology(path)
    graph = gossip_graph(topology)
    silent = {sorted(graph)[-1]} if dropout else set()
    sites = run_views(graph, mixing_weights(graph, topology.gossip.samples), 2, silent)
    learned = 0
    for name, site in sites.items():
        for round, rows in site.views.items():
            assert len(rows) == 1, (name, round, rows)  # one sum per round and aggregator
            assert isolated_sites(rows) == [], (name, round, rows)
            learned += 1
    if not dropout:
        assert learned >= len(graph)  # the sums really ran
    elif min(len(n) for n in graph.values()) >= 4:  # groups of 4+ survive a dropout: did they?
        assert any(len(rows[0]) < len(graph[n]) for n, s in sites.items() if n not in silent
                   for rows in s.views.values())


@pytest.mark.parametrize("sites", ["abc", "abcd"])
def test_with_chunked_sums_no_site_s_sums_and_published_mixes_isolate_another_site_s_model(sites):
    # The smallest groups, where a published mix is a sum of the fewest models (groups of 2
    # and 3 go on with no member dropped).
    graph = complete(sites)
    silent = set()
    run = run_views(graph, mixing_weights(graph, {}), 2, silent, chunked=True)
    published = 0
    for name, site in run.items():
        for round, rows in site.views.items():
            assert len(rows) == 1 and isolated_sites(rows) == [], (name, round, rows)
        for other in set(graph) - {name}:
            for round, mix in run[other].published.items():
                # On `other`'s slice: its mix, and our own model, which we know.
                assert set(isolated_sites([{name: 1.0}, mix])) <= {name}, (name, other, round, mix)
                published += 1
    assert published >= len(graph) - len(silent)


def test_the_rank_test_finds_the_old_catch_up_leak_and_config_refuses_a_leaking_graph():
    # a on a 4-site ring used to learn its sum (b + d) plus, by fetching, b's and d's mixes
    # (each less its own model): three equations, three unknowns.
    assert isolated_sites([{"b": 1, "d": 1}, {"a": 0, "b": 1, "c": 1}, {"c": 1, "d": 1}]) == ["b", "c", "d"]
    assert isolated_sites([{"b": 1, "d": 1}]) == []
    peers = "".join(f'[[peers]]\nname = "{n}"\n' for n in "abc")
    text = ('federation = "f"\nprotocol = "gossip"\n[gossip]\ngraph = "edges"\nedges = [["a", "b"], ["b", "c"]]\n'
            + peers)
    import tomllib

    with pytest.raises(ConfigError, match="would reveal"):
        parse_topology(tomllib.loads(text))
    assert ring_neighbours(list("abcd"))  # the 4-site ring itself is accepted now: no fetch exists
