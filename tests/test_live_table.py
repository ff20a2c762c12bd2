"""Launch's live table: round n of N at each site and, in its title, the trainings done out
of the whole federation's with an estimate of the time left."""

from pathlib import Path

from p2p_fl.config import load_topology
from p2p_fl.launch import _apply_event, progress_line, total_trainings

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def test_the_federation_s_trainings_and_the_time_left_follow_the_events():
    ring, gossip = load_topology(TOPOLOGIES / "ring-3.toml"), load_topology(TOPOLOGIES / "gossip-3.toml")
    assert total_trainings(ring) == ring.training.rounds * 3  # every hop of every cycle
    assert total_trainings(gossip) == gossip.training.rounds * 3  # every round at every site
    status = {n: {} for n in ring.names}
    assert progress_line(ring, status, 10.0) == f"0/{total_trainings(ring)} trainings"
    for name in ring.names[:2]:  # two hops trained in 40 s
        _apply_event(status[name], {"event": "trained", "val_auc": 0.5, "bytes_sent": 0, "train_loss": 0.7})
    total = total_trainings(ring)
    assert progress_line(ring, status, 40.0) == f"2/{total} trainings, about {40 * (total - 2) / 2:.0f} s left"
