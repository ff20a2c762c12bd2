"""The chaos harness's invariant checker, on run folders written by hand as a launch writes
them: it passes a clean run and names each broken promise. (The harness's real trials run
with `p2p-fl chaos`; a bounded one is in test_chaos_trial below, marked slow.)"""

import json

import numpy as np
import pytest

from p2p_fl.chaos import Fault, check_run, plan_faults
from processes import p2p_fl

RING = ('federation = "chaos-test"\nprotocol = "cwt"\n[training]\nrounds = 2\n[ring]\norder = "listed"\n'
        '[network]\ninsecure = true\n[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n')
GOSSIP = ('federation = "chaos-test"\nprotocol = "gossip"\n[training]\nrounds = 2\n[gossip]\nsecure = false\n'
          '[network]\ninsecure = true\n[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n[[peers]]\nname = "c"\n')


def write_run(out, topology, metrics, models, shortfall=None, log=""):
    (out).mkdir(parents=True, exist_ok=True)
    (out / "topology.toml").write_text(topology)
    for site, records in metrics.items():
        folder = out / site
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "result.json").write_text(json.dumps({"name": site, "shortfall": (shortfall or {}).get(site, ""),
                                                        "dropped": {}}))
        np.savez(folder / "final_model.npz", w=np.full(3, models[site], np.float32))
        (folder / "node.log").write_text(log if site == "a" else "")
    return out


def hop(round_):
    return {"round": round_, "train_loss": 0.5}


def test_a_clean_ring_run_passes(tmp_path):
    out = write_run(tmp_path / "run", RING, {"a": [hop(0), hop(2)], "b": [hop(1), hop(3)]}, {"a": 1.0, "b": 1.0})
    assert check_run(out, "cwt", []) == {"violations": [], "degraded": 0, "alone": []}


def test_the_checker_names_a_hop_trained_by_the_wrong_site_a_fork_and_lost_hops(tmp_path):
    out = write_run(tmp_path / "run", RING, {"a": [hop(0), hop(1)], "b": [hop(1)]}, {"a": 1.0, "b": 2.0})
    violations = check_run(out, "cwt", [Fault("kill", "a", 5.0)])["violations"]
    assert "hop 1 trained by a, not by b alone" in violations
    assert any("the ring forked" in v for v in violations)
    assert any("hops [3] never trained, though no fault hit their sites" in v for v in violations)
    assert not any("[2" in v for v in violations)  # a's hop 2: a was killed, its hop may be skipped


def test_a_site_that_ended_without_the_federation_or_with_a_traceback_is_a_violation(tmp_path):
    out = write_run(tmp_path / "run", RING, {"a": [hop(0), hop(2)], "b": [hop(1), hop(3)]}, {"a": 1.0, "b": 1.0},
                    shortfall={"b": "no other site's model reached it"}, log="Traceback (most recent call last):")
    violations = check_run(out, "cwt", [])["violations"]
    assert "a: a traceback in node.log" in violations
    assert "b ended without the federation: no other site's model reached it" in violations
    # b down most of the run (a fault hit it) may end alone, if it says so: not a violation
    checked = check_run(out, "cwt", [Fault("kill", "b", 5.0)])
    assert checked["alone"] == ["b"] and not any(v.startswith("b ") for v in checked["violations"])


def mix(survivors, kept_own=False):
    return {"round": 2, "mixed_round": 1, "survivors": survivors, "kept_own": kept_own}


def test_gossip_sites_that_mixed_every_model_must_agree_a_kept_own_last_mix_is_only_degraded(tmp_path):
    agree = write_run(tmp_path / "agree", GOSSIP, {"a": [mix(2)], "b": [mix(2)], "c": [mix(1, kept_own=True)]},
                      {"a": 1.0, "b": 1.0, "c": 5.0})
    assert check_run(agree, "gossip", []) == {"violations": [], "degraded": 1, "alone": []}
    # c's last mix took in nobody (back after the others had gone): fine if it says so
    quiet = write_run(tmp_path / "quiet", GOSSIP, {"a": [mix(2)], "b": [mix(2)], "c": [mix(0)]},
                      {"a": 1.0, "b": 1.0, "c": 5.0})
    assert check_run(quiet, "gossip", [Fault("kill", "c", 5.0)])["violations"] == [
        "c: no neighbour's model reached its last mix, yet it ended as if it had taken part (no shortfall)"]
    said = write_run(tmp_path / "said", GOSSIP, {"a": [mix(2)], "b": [mix(2)], "c": [mix(0)]},
                     {"a": 1.0, "b": 1.0, "c": 5.0}, shortfall={"c": "no neighbour's model reached its last mix"})
    assert check_run(said, "gossip", [Fault("kill", "c", 5.0)]) == {"violations": [], "degraded": 0, "alone": ["c"]}
    differ = write_run(tmp_path / "differ", GOSSIP, {"a": [mix(2)], "b": [mix(2)], "c": [mix(2)]},
                       {"a": 1.0, "b": 1.0, "c": 1.1})
    [violation] = check_run(differ, "gossip", [])["violations"]
    assert violation.startswith("c and a mixed every model of the last round but differ by 0.1")


def test_fault_plans_are_seeded_of_the_kinds_asked_and_overlap_only_at_once_in_two_sites():
    import random

    assert plan_faults(random.Random(7), ("freeze", "disk"), ["s0", "s1"], 2.0) == \
        plan_faults(random.Random(7), ("freeze", "disk"), ["s0", "s1"], 2.0)
    rng, together = random.Random(7), 0
    for _ in range(200):
        plan = plan_faults(rng, ("freeze", "starve", "cut", "disk"), ["s0", "s1", "s2"], 2.0)
        for fault in plan:
            assert fault.kind in ("freeze", "starve", "cut", "disk") and fault.length_s > 0
        for earlier, later in zip(plan, plan[1:]):
            if later.at_s == earlier.at_s:  # two sites hit at the same moment
                assert later.site != earlier.site
                together += 1
            else:  # or one after every fault before it ended
                assert later.at_s >= max(f.at_s + f.length_s for f in plan[:plan.index(later)])
    assert together > 10


@pytest.mark.slow
def test_chaos_trial_with_a_kill_and_a_freeze_passes_its_invariants(tmp_path):
    proc = p2p_fl("chaos", "--protocols", "cwt,secure-gossip", "--trials", "1", "--faults", "kill,freeze",
                  "--seed", "3", "--out", str(tmp_path / "chaos"), timeout=1200)
    records = [json.loads(line) for line in (tmp_path / "chaos" / "chaos.jsonl").read_text().splitlines()]
    assert proc.returncode == 0 and all(not r["violations"] for r in records), proc.stdout + proc.stderr
    assert sum(len(r["faults"]) for r in records) >= 2
