"""Topology files: the shipped ones parse; every wrong file is refused naming the field."""

from pathlib import Path

import pytest

from p2p_fl.config import ConfigError, dump_topology, load_topology, logit_adjustment_applies, parse_topology

TOPOLOGIES = sorted((Path(__file__).parent.parent / "topologies").glob("*.toml"))
MINIMAL = 'federation = "f"\nprotocol = "cwt"\n[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n'


def load_text(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    return load_topology(path)


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.name)
def test_shipped_topologies_parse_and_round_trip(path):
    topology = load_topology(path)
    import tomllib
    assert parse_topology(tomllib.loads(dump_topology(topology))) == topology


def test_shipped_set_is_complete():
    assert {p.name for p in TOPOLOGIES} >= {"ring-3.toml", "ring-10.toml", "swt-3.toml", "local-3.toml"}
    assert len(load_topology(TOPOLOGIES[0].parent / "ring-10.toml").peers) == 10


def test_defaults_fill_missing_sections(tmp_path):
    t = load_text(tmp_path, MINIMAL)
    assert t.training.model == "small-cnn" and t.training.rounds >= 1 and t.seed == 0
    assert t.names == ["a", "b"]


@pytest.mark.parametrize("text, field", [
    ("colour = 1\n" + MINIMAL, "unknown field 'colour'"),
    (MINIMAL.replace('protocol = "cwt"', 'protocol = "telepathy"'), "protocol 'telepathy'"),
    (MINIMAL + "[training]\nrounds = 0\n", "training.rounds"),
    (MINIMAL + "[training]\nrounds = 'five'\n", "training.rounds must be int"),
    (MINIMAL + "[training]\nlearning_rte = 0.1\n", "unknown field training.learning_rte"),
    (MINIMAL + "[training]\noptimizer = 'lbfgs'\n", "training.optimizer"),
    (MINIMAL.replace('name = "b"', 'name = "a"'), "duplicate name 'a'"),
    (MINIMAL.replace('name = "b"', 'name = "b"\naddress = "http://x"'), "peers[1].address"),
    (MINIMAL.replace('name = "b"', 'name = "b c"'), "peers[1].name"),
    (MINIMAL.replace('name = "b"', 'nam = "b"'), "unknown field peers[1].nam"),
    ('federation = "f"\nprotocol = "cwt"\n[[peers]]\nname = "a"\n', "at least 2 peers"),
    ('protocol = "cwt"\n[[peers]]\nname = "a"\n', "missing field 'federation'"),
    (MINIMAL.replace('"cwt"', '"swt"') + "[training]\nrounds = 3\n", "must be 1 for swt"),
    (MINIMAL + "[network]\nack_timeout_s = -1\n", "network.ack_timeout_s"),
    (MINIMAL.replace('"cwt"', '"ensemble"') + "[ensemble]\nwait_s = 0\n", "ensemble.wait_s must be > 0"),
    ('federation = "f"\nprotocol = "ensemble"\n[[peers]]\nname = "a"\n', "an ensemble needs at least 2 peers"),
    ("federation = \n", "not valid TOML"),
])
def test_wrong_files_are_refused_naming_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as err:
        load_text(tmp_path, text)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="no such topology file"):
        load_topology(tmp_path / "nope.toml")


def test_unknown_node_name_lists_the_peers(tmp_path):
    with pytest.raises(ConfigError, match="peers: a, b"):
        load_text(tmp_path, MINIMAL).peer("z")


@pytest.mark.parametrize("text, field", [
    (MINIMAL + "[training]\nprox_mu = -0.1\n", "training.prox_mu must be >= 0"),
    (MINIMAL.replace('"cwt"', '"ensemble"') + "[training]\nfedbn = true\n", "training.fedbn"),
    (MINIMAL + "[privacy]\nenabled = true\n", "privacy.target_epsilon or privacy.noise_multiplier"),
    (MINIMAL + "[privacy]\nenabled = true\ntarget_epsilon = -1\n", "privacy.target_epsilon must be > 0"),
    (MINIMAL + "[privacy]\nnoise_multiplier = nan\n", "privacy.noise_multiplier must be > 0"),
    (MINIMAL + "[privacy]\nenabled = true\nnoise_multiplier = 1.0\nclip_norm = 0\n", "privacy.clip_norm"),
    (MINIMAL + "[privacy]\nenabled = true\ntarget_epsilon = 3\ndelta = 1\n", "privacy.delta must be below 1"),
    (MINIMAL + "[privacy]\nepsilon = 3\n", "unknown field privacy.epsilon"),
    (MINIMAL + "[data]\nimage_size = 5000\n", "data.image_size must be 1..1024"),
    (MINIMAL + "[data]\nchannels = 2\n", "data.channels must be 1"),
    (MINIMAL + "[data]\nscore_last_rounds = -1\n", "data.score_last_rounds must be >= 0"),
    (MINIMAL + "[data]\nclasses = [\"normal\"]\n", "at least 2 classes"),
    (MINIMAL + "[data]\nclasses = [\"NORMAL\", \"normal\"]\n", "twice"),
    (MINIMAL + "[data]\nclasses = [\"a\", 3]\n", "data.classes must be a list of class names"),
])
def test_non_iid_and_privacy_fields_are_checked(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field):
        load_text(tmp_path, text)


def test_non_iid_and_privacy_fields_parse_and_round_trip(tmp_path):
    import tomllib

    t = load_text(tmp_path, MINIMAL + "[training]\nprox_mu = 0.01\nfedbn = true\n"
                  "[privacy]\nenabled = true\ntarget_epsilon = 3\nnoise_multiplier = 1.1\n")
    assert (t.training.prox_mu, t.training.fedbn) == (0.01, True)
    assert (t.privacy.target_epsilon, t.privacy.noise_multiplier, t.privacy.delta) == (3.0, 1.1, 0.0)
    assert "[privacy]" in dump_topology(t)
    assert parse_topology(tomllib.loads(dump_topology(t))) == t
    default = load_text(tmp_path, MINIMAL)
    assert not default.privacy.enabled and default.training.prox_mu == 0 and not default.training.fedbn


@pytest.mark.parametrize("value, message", [
    ("0", "network.max_message_mb must be > 0 and at most 4096"),
    ("-5", "network.max_message_mb must be > 0 and at most 4096"),
    ("4097", "network.max_message_mb must be > 0 and at most 4096"),
    ("1000000000000", "network.max_message_mb must be > 0 and at most 4096"),
    ("'512'", "network.max_message_mb must be int"),
    ("1.5", "network.max_message_mb must be int"),
    ("true", "network.max_message_mb must be int"),
    ("nan", "network.max_message_mb must be int"),
])
def test_max_message_mb_is_a_sane_number_of_mib(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_text(tmp_path, MINIMAL + f"[network]\nmax_message_mb = {value}\n")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("value", [1, 512, 4096])
def test_max_message_mb_in_range_is_accepted(tmp_path, value):
    assert load_text(tmp_path, MINIMAL + f"[network]\nmax_message_mb = {value}\n").network.max_message_mb == value


def test_a_topology_names_no_shared_test_set_unless_it_says_so(tmp_path):
    assert load_text(tmp_path, MINIMAL).data.test == ""  # each site's own test split


def test_launch_data_override_moves_a_shared_test_set_that_was_the_datasets_own(tmp_path):
    from p2p_fl.launch import with_overrides

    shipped = load_topology(TOPOLOGIES[0].parent / "ring-3.toml")
    assert shipped.data.test == shipped.data.dataset == "builtin:pneumoniamnist"
    moved = with_overrides(shipped, dataset="other.npz")
    assert moved.data.dataset == moved.data.test == "other.npz"  # never scored on PneumoniaMNIST's test set
    other_test = load_text(tmp_path, MINIMAL + '[data]\ndataset = "a.npz"\ntest = "b.npz"\n')
    assert with_overrides(other_test, dataset="c.npz").data.test == "b.npz"  # named on purpose: kept


def test_logit_adjustment_is_on_by_default_and_under_dp_only_with_a_target(tmp_path):
    assert logit_adjustment_applies(load_text(tmp_path, MINIMAL))
    assert not logit_adjustment_applies(load_text(tmp_path, MINIMAL + "[training]\nlogit_adjustment = false\n"))
    # Under DP the noisy counts take a share of the target epsilon: without one, it is off.
    assert not logit_adjustment_applies(load_text(
        tmp_path, MINIMAL + "[training]\nlogit_adjustment = true\n[privacy]\nenabled = true\nnoise_multiplier = 1.0\n"))
    assert logit_adjustment_applies(load_text(
        tmp_path, MINIMAL + "[privacy]\nenabled = true\ntarget_epsilon = 3.0\n"))
