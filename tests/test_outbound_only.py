"""A hospital whose firewall allows only outbound connections takes part: its node listens
nowhere, connects out to every peer, and they answer on those connections (CURVE-authenticated
as ever). Real node processes; the outbound-only node is checked to hold no listening socket."""

import json
import subprocess
import time

import numpy as np
import pytest

from processes import small_shards, start_node, write_federation

from p2p_fl.config import ConfigError, load_topology

RING = ('protocol = "cwt"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n[data]\ntest = ""\n'
        '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 4.0\nstart_window_s = 120\n')
GOSSIP = ('protocol = "gossip"\n[training]\nrounds = 2\nlocal_epochs = 1\nbatch_size = 32\n[data]\ntest = ""\n'
          '[gossip]\nsecure = true\nround_timeout_s = 30.0\n'
          '[network]\nheartbeat_interval_s = 0.3\npeer_timeout_s = 4.0\nstart_window_s = 120\n')


def outbound_only(config, name):
    """The topology with `name` outbound-only: no address, inbound = false."""
    lines, out, current = config.read_text().splitlines(), [], None
    for line in lines:
        if line.startswith("name = "):
            current = line.split('"')[1]
        if current == name and line.startswith("address = "):
            out.append("inbound = false")
            continue
        out.append(line)
    config.write_text("\n".join(out) + "\n")


def listening_pids() -> str:
    return subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.parametrize("settings", [RING, GOSSIP], ids=["cwt", "secure-gossip"])
def test_an_outbound_only_site_takes_part_and_listens_nowhere(tmp_path, settings):
    config = write_federation(tmp_path, "abc", settings, federation="outbound")
    outbound_only(config, "c")
    assert not load_topology(config).peer("c").inbound
    shards = small_shards(tmp_path, "abc", train=192, val=48, test=48)
    procs = {n: start_node(config, n, shards[n], tmp_path / n, num_nodes=3) for n in "abc"}
    try:
        deadline = time.monotonic() + 240
        while "every peer heard" not in (tmp_path / "c" / "node.log").read_text():
            assert time.monotonic() < deadline and procs["c"].poll() is None, (tmp_path / "c" / "node.log").read_text()
            time.sleep(0.2)
        sockets = listening_pids()
        assert f"pid={procs['a'].pid}," in sockets  # a listens (the check can see listeners)
        assert f"pid={procs['c'].pid}," not in sockets  # c does not
        for proc in procs.values():
            proc.communicate(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for n, proc in procs.items():
        assert proc.returncode == 0, (n, (tmp_path / n / "node.log").read_text()[-3000:])
        assert json.loads((tmp_path / n / "result.json").read_text())["shortfall"] == ""
    if settings is RING:
        finals = [dict(np.load(tmp_path / n / "final_model.npz")) for n in "abc"]
        assert all(np.array_equal(finals[0][k], f[k]) for f in finals[1:] for k in finals[0])
    else:
        mixes = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
                 if "mixed_round" in line]
        assert [m["survivors"] for m in mixes] == [2, 2]  # c summed with both others every round


def test_two_outbound_only_sites_are_refused_naming_them(tmp_path):
    config = write_federation(tmp_path, "abc", RING, federation="outbound2")
    outbound_only(config, "b")
    outbound_only(config, "c")
    with pytest.raises(ConfigError, match="b, c all accept no inbound connections"):
        load_topology(config)
