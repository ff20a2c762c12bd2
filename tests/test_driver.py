"""The driver between a site's protocol and its transport: a real site (learner, ring
protocol, files) over the in-memory transport."""

import logging
import tomllib

import numpy as np
import pytest

from p2p_fl.checkpoint import CheckpointError, CheckpointWriteError
from p2p_fl.config import parse_topology
from p2p_fl.data import Dataset, Split, load_dataset
from p2p_fl.driver import Driver
from p2p_fl.net import wire
from p2p_fl.net.memory import MemoryHub
from p2p_fl.simulate import VirtualClock
from p2p_fl.site import Site

TOPOLOGY = """
federation = "driver"
protocol = "cwt"
[training]
rounds = 1
[ring]
order = "listed"
[network]
insecure = true
[[peers]]
name = "a"
[[peers]]
name = "b"
"""


@pytest.fixture()
def b(tmp_path):
    """Site b of a two-site ring (hop 0 is a's, hop 1 b's), with a's end of the network."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    data = Dataset(take(full.train, 64), take(full.val, 16), take(full.test, 16), 2, "tiny")
    topology = parse_topology(tomllib.loads(TOPOLOGY))
    clock = VirtualClock()
    site = Site(topology, "b", data, tmp_path / "b", curve=None, durable=False)
    hub = MemoryHub("driver", site.shared_spec(), peer_timeout_s=10.0, clock=clock)
    driver = Driver(site, hub.transport("b", ["a"]))
    a = hub.transport("a", ["b"])
    a.pulse(0)  # a is up: b's start window opens at its first poll
    driver.start(clock())
    return driver, a, hub, clock


def test_a_hop_is_acknowledged_only_once_its_checkpoint_is_on_disk(b):
    driver, a, hub, clock = b
    weights = {name: np.zeros(shape, dtype) for name, dtype, shape in driver.site.shared_spec()}
    a.send("b", wire.MODEL, 1, weights, {"cycle": 0, "skipped": 0})
    driver.poll(clock, 0.0)
    (ack,) = a.receive()
    assert ack.type == wire.ACK and ack.round == 1
    assert driver.site.checkpoint_path.exists() and driver.next_training().round == 1


def test_when_the_checkpoint_cannot_be_written_nothing_leaves(b):
    """The driver writes the checkpoint a callback asks for before any of its messages: if
    the write fails the site stops (and resumes from its last good checkpoint); the ack that
    depended on it never left."""
    driver, a, hub, clock = b
    driver.site.checkpoint_path.mkdir()  # a folder where the file must go: the write fails
    weights = {name: np.zeros(shape, dtype) for name, dtype, shape in driver.site.shared_spec()}
    a.send("b", wire.MODEL, 1, weights, {"cycle": 0, "skipped": 0})
    with pytest.raises(CheckpointWriteError, match="cannot write the checkpoint"):  # one line from `p2p-fl node`
        driver.poll(clock, 0.0)
    assert a.receive() == [] and hub.in_flight == 0
    assert driver.next_training() is None


def test_a_refused_message_is_counted_and_the_site_goes_on(b):
    driver, a, hub, clock = b
    weights = {name: np.zeros(shape, dtype) for name, dtype, shape in driver.site.shared_spec()}
    a.send("b", wire.MODEL, 0, weights, {"cycle": 0, "skipped": 0})  # hop 0 is a's own
    driver.poll(clock, 0.0)
    assert driver.transport.dropped["refused"] == 1 and a.receive() == []
    assert driver.final is None and driver.next_training() is None


def site_a(tmp_path, clock, hub_peers=("a", "b")):
    """Site a, the ring's first holder, over a fresh hub; returns (driver, hub)."""
    full = load_dataset("builtin:pneumoniamnist")
    take = lambda split, n: Split(split.images[:n], split.labels[:n])  # noqa: E731
    data = Dataset(take(full.train, 64), take(full.val, 16), take(full.test, 16), 2, "tiny")
    topology = parse_topology(tomllib.loads(TOPOLOGY.replace("[network]", "[network]\nstart_window_s = 60.0")))
    site = Site(topology, "a", data, tmp_path / "a", curve=None, durable=False)
    hub = MemoryHub("driver", site.shared_spec(), peer_timeout_s=10.0, clock=clock)
    return Driver(site, hub.transport("a", ["b"])), hub


def test_a_fresh_site_waits_for_its_peers_before_its_first_round_and_keeps_what_arrives(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    clock = VirtualClock()
    driver, hub = site_a(tmp_path, clock)
    driver.start(clock())
    for _ in range(3):
        clock.now += 5.0
        driver.poll(clock, 0.0)
    assert driver.next_training() is None  # hop 0 is a's, but b has not been heard
    assert "waiting up to 60 s for b" in caplog.text
    b = hub.transport("b", ["a"])
    b.pulse(0)
    b.send("a", wire.ACK, 0, meta={"of": wire.MODEL})  # arrives with b's first heartbeat
    driver.poll(clock, 0.0)
    assert driver.next_training().round == 0  # b heard: the ring starts
    assert driver.transport.dropped["refused"] == 0  # the held ack reached the protocol (an ack of nothing: ignored)
    assert "every peer heard" in caplog.text


def test_a_fresh_site_starts_without_a_silent_peer_once_the_window_is_over(tmp_path, caplog):
    clock = VirtualClock()
    driver, hub = site_a(tmp_path, clock)
    driver.start(clock())
    clock.now += 59.0
    driver.poll(clock, 0.0)
    assert driver.next_training() is None
    clock.now += 2.0
    driver.poll(clock, 0.0)
    assert driver.next_training().round == 0
    assert "starting without b" in caplog.text


def test_a_resumed_site_does_not_wait_it_rejoins(tmp_path):
    clock = VirtualClock()
    driver, hub = site_a(tmp_path, clock)
    driver.site.save_checkpoint()
    resumed, _ = site_a(tmp_path, clock)  # the same folder: it resumes from the checkpoint
    assert resumed.site.resumes == 1
    resumed.start(clock())
    assert resumed.next_training().round == 0


def test_a_site_whose_peers_are_all_gone_gives_up_after_the_window_not_the_run_timeout(b):
    """b waits for its ring hop; a (the only peer) goes away for good, as a federation that
    finished while b was down. b stops waiting start_window_s after a was declared dead
    (the node then exits 4, checkpoint kept), not after run_timeout_s (an hour)."""
    driver, a, hub, clock = b
    driver.poll(clock, 0.0)  # a heard: b's protocol starts and waits for hop 1
    hub.down("a")
    window = driver.site.topology.network.start_window_s
    clock.now += 11.0  # past peer_timeout_s: a is dead
    driver.poll(clock, 0.0)
    assert driver.abandoned(clock()) is None
    clock.now += window - 1.0
    driver.poll(clock, 0.0)
    assert driver.abandoned(clock()) is None
    clock.now += 2.0
    assert "no peer heard for" in driver.abandoned(clock())


def test_a_finished_run_is_refused_even_if_the_end_was_killed_before_its_checkpoint_went(tmp_path):
    """The end writes the models, then result.json (the mark of a finished run), then
    deletes the checkpoint; a kill between the last two must not let a restart resume."""
    clock = VirtualClock()
    driver, _ = site_a(tmp_path, clock)
    driver.site.save_checkpoint()
    (tmp_path / "a" / "result.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds a finished run"):
        site_a(tmp_path, clock)
    assert not (tmp_path / "a" / "checkpoint.npz").exists()
