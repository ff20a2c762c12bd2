"""The head refit (learn/head_refit.py): Newton steps on the pooled statistics that every
gossip site takes alike, what a dishonest site can do to them, and its configuration."""

import json
import tomllib

import numpy as np
import pytest
from processes import p2p_fl, shipped_topology
from routing import route
from scipy.optimize import minimize
from test_protocol_gossip import secure_setups

from p2p_fl.config import ConfigError, parse_topology
from p2p_fl.federate import complete
from p2p_fl.learn.head_refit import (
    BIAS,
    GRADIENT,
    HESSIAN,
    KERNEL,
    VALIDATION,
    MAX_STEP,
    HeadRefit,
    head_statistics,
    newton_step,
    refit_applies,
    statistics_spec,
    zero_statistics,
)
from p2p_fl.net import wire
from p2p_fl.protocols import GossipProtocol
from p2p_fl.protocols.gossip import mixing_weights

FEATURES = 6


def _skewed_sites(classes=2, seed=0, validation=False):
    """Four sites, each with mostly one class: features are class means plus noise; with
    `validation`, (train features, labels, validation features, labels) a site."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=1.0, size=(classes, FEATURES))

    def draw(prior, size):
        labels = rng.choice(classes, size=size, p=prior)
        return np.maximum(means[labels] + rng.normal(scale=1.2, size=(size, FEATURES)), 0).astype(np.float32), labels

    sites = {}
    for i, (name, size) in enumerate(zip("abcd", (40, 90, 150, 60))):
        prior = np.full(classes, 0.1 / (classes - 1))
        prior[i % classes] = 0.9
        sites[name] = draw(prior, size) + (draw(prior, size // 4) if validation else ())
    return sites


def _head(classes, value=0.0):
    logits = 1 if classes == 2 else classes
    return {KERNEL: np.full((FEATURES, logits), value, np.float32), BIAS: np.full(logits, value, np.float32)}


def _spec(classes):
    return wire.spec_of({**_head(classes), **zero_statistics(_spec_of_head(classes))})


def _spec_of_head(classes):
    return [(name, "float32", value.shape) for name, value in _head(classes).items()]


def _pooled_loss(head, features, labels, classes):
    return head_statistics(features, labels, head[KERNEL], head[BIAS])[1]


@pytest.mark.pure
@pytest.mark.parametrize("classes", [2, 3])
def test_newton_steps_on_averaged_site_statistics_reach_the_pooled_fit(classes):
    """Sample-count weighted means of the sites' statistics are the pooled ones, so the
    refit lands where a logistic regression fitted on all sites' examples at once does
    (scipy's, on the pooled data), and not where the average of the sites' own fits does."""
    sites = _skewed_sites(classes)
    features = np.concatenate([f for f, _ in sites.values()])
    labels = np.concatenate([y for _, y in sites.values()])
    total = len(labels)
    head = _head(classes)
    for _ in range(12):
        stats = [head_statistics(f, y, head[KERNEL], head[BIAS])[0] for f, y in sites.values()]
        mean = {k: sum(len(y) * s[k].astype(np.float64) for s, (_, y) in zip(stats, sites.values())) / total
                for k in (GRADIENT, HESSIAN)}
        head[KERNEL], head[BIAS], _ = newton_step(head[KERNEL], head[BIAS], mean[GRADIENT], mean[HESSIAN])

    logits = head[BIAS].size

    def loss(theta):
        h = theta.reshape(FEATURES + 1, logits)
        return _pooled_loss({KERNEL: h[:-1], BIAS: h[-1]}, features, labels, classes)

    best = minimize(loss, np.zeros((FEATURES + 1) * logits), method="BFGS", options={"gtol": 1e-9})
    refit = np.vstack([head[KERNEL], head[BIAS][None, :]])
    if classes == 2:  # one logit, the exact Hessian: the pooled optimum (the ridge costs under 1e-4 of its loss)
        assert loss(refit.ravel()) == pytest.approx(best.fun, rel=1e-4)
        np.testing.assert_allclose(refit.ravel(), best.x, atol=0.02)
    else:  # the Hessian's diagonal blocks: a descent that converges linearly, within 1% in 12 steps
        assert best.fun <= loss(refit.ravel()) <= 1.01 * best.fun
    # The mean of each site's own fit is not it: label skew is what the pooled statistics fix.
    own = []
    for f, y in sites.values():
        h = _head(classes)
        for _ in range(12):
            s = head_statistics(f, y, h[KERNEL], h[BIAS])[0]
            h[KERNEL], h[BIAS], _ = newton_step(h[KERNEL], h[BIAS], s[GRADIENT], s[HESSIAN])
        own.append((len(y), np.vstack([h[KERNEL], h[BIAS][None, :]])))
    averaged = sum(n * h for n, h in own) / total
    assert loss(averaged.ravel()) > best.fun + 0.01


@pytest.mark.pure
def test_whatever_the_average_holds_a_step_moves_the_head_at_most_the_cap():
    rng = np.random.default_rng(1)
    spec = statistics_spec(_spec_of_head(2))
    shapes = {name: shape for name, _, shape in spec}
    head = _head(2, 0.3)
    for trial in range(200):
        scale = 10.0 ** rng.uniform(-8, 1.2)  # near-singular to beyond the clip (16)
        gradient = rng.normal(scale=scale, size=shapes[GRADIENT]).astype(np.float32)
        hessian = (rng.normal(scale=scale, size=shapes[HESSIAN]) * (1 if trial % 2 else -1)).astype(np.float32)
        kernel, bias, _ = newton_step(head[KERNEL], head[BIAS], gradient, hessian)
        moved = np.sqrt(np.sum((kernel - head[KERNEL]) ** 2) + np.sum((bias - head[BIAS]) ** 2))
        assert np.isfinite(kernel).all() and np.isfinite(bias).all()
        assert moved <= MAX_STEP * (1 + 1e-5)
    # A plain average of huge values overflows float32: no step, and nothing raised.
    overflow = np.full(shapes[HESSIAN], np.inf, np.float32)
    kernel, bias, norm = newton_step(head[KERNEL], head[BIAS], np.zeros(shapes[GRADIENT], np.float32), overflow)
    np.testing.assert_array_equal(kernel, head[KERNEL])
    assert norm == np.inf


def _refit_sites(graph, samples, steps, secure):
    initial = {**_head(2), **zero_statistics(_spec_of_head(2))}
    return {n: GossipProtocol(n, graph, mixing_weights(graph, samples), 1, round_timeout_s=10.0,
                              secure=secure and secure[n], initial=initial, refit=HeadRefit(steps)) for n in graph}


def _deliver(spec):
    def deliver(sender, send):
        frames = wire.encode(send.type, federation="fed", sender=sender, round=send.round, seq=0,
                             tensors=send.weights, meta=send.meta)
        return wire.decode([bytes(f) for f in frames], federation="fed", senders={sender}, tensor_spec=spec)
    return deliver


def _site_step(sites, liar=None):
    """A site's part of each round: training moves nothing here (one round, the head at 0);
    a refit round answers with its statistics; `liar` answers with statistics of its own making."""
    def train(name, step):
        model = {k: v for k, v in (step.weights or _head(2)).items() if not k.startswith("head_refit/")}
        if "head_refit_step" not in step.meta:
            return {**model, **zero_statistics(_spec_of_head(2))}
        if name == liar:
            return {**model, GRADIENT: np.full_like(model[KERNEL], 15.0, shape=(FEATURES + 1,)),
                    HESSIAN: np.full((1, (FEATURES + 1) * (FEATURES + 2) // 2), -15.0, np.float32),
                    VALIDATION: np.array([-15.0, 15.0], np.float32)}
        features, labels, val_features, val_labels = sites[name]
        return {**model, **head_statistics(features, labels, model[KERNEL], model[BIAS], (val_features, val_labels))[0]}
    return train


@pytest.mark.pure
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_gossip_sites_refit_the_same_head_to_the_pooled_fit(secure):
    """Real gossip state machines on the complete graph (plain, and secure sums: masked,
    fixed point) exchange each refit round's statistics; every site takes the same steps
    and ends with the head that Newton steps on the pooled examples reach, chosen among them
    by the pooled validation loss as one would with all the data in one place."""
    sites = _skewed_sites(validation=True)
    graph = complete(sites)
    samples = {n: len(site[1]) for n, site in sites.items()}
    protocols = _refit_sites(graph, samples, 5, secure_setups(graph, clip=16.0) if secure else None)
    train = _site_step(sites)
    finals = route(protocols, lambda site, step: train(site, step), _deliver(_spec(2))).finals
    heads = {n: np.r_[f.weights[KERNEL].ravel(), f.weights[BIAS]] for n, f in finals.items()}
    for n in heads:
        np.testing.assert_allclose(heads[n], heads["a"], atol=1e-4)
        assert not finals[n].weights[HESSIAN].any()  # statistics never stay in a model
    pooled = [np.concatenate([site[i] for site in sites.values()]) for i in range(4)]
    reference, candidates = _head(2), []
    for _ in range(6):  # the trained head and 5 steps, each scored on the pooled validation images
        s = head_statistics(pooled[0], pooled[1], reference[KERNEL], reference[BIAS], (pooled[2], pooled[3]))[0]
        candidates.append((s[VALIDATION][0] / s[VALIDATION][1], np.r_[reference[KERNEL].ravel(), reference[BIAS]]))
        reference[KERNEL], reference[BIAS], norm = newton_step(reference[KERNEL], reference[BIAS], s[GRADIENT],
                                                               s[HESSIAN])
    assert norm < 0.1  # converged by the fifth step
    best = min(range(6), key=lambda i: candidates[i][0])
    assert best > 0  # the refit pays on validation here
    np.testing.assert_allclose(heads["a"], candidates[best][1], atol=1e-3)
    assert all(f.meta["head_refit_kept_step"] == best for f in finals.values())


@pytest.mark.pure
def test_a_dishonest_site_moves_the_honest_heads_at_most_the_cap_each_step():
    """Site d runs modified code and answers every refit round with statistics built to
    blow the head up (a negative Hessian, a large gradient), through the real secure sums:
    the honest sites stay identical and finite, and each step moved them at most MAX_STEP
    (the head kept is one of the steps': within steps x MAX_STEP of the trained one)."""
    sites = _skewed_sites(validation=True)
    graph = complete(sites)
    samples = {n: len(site[1]) for n, site in sites.items()}
    steps = 3
    protocols = _refit_sites(graph, samples, steps, secure_setups(graph, clip=16.0))
    train = _site_step(sites, liar="d")
    finals = route(protocols, lambda site, step: train(site, step), _deliver(_spec(2))).finals
    honest = [n for n in finals if n != "d"]
    heads = {n: np.r_[finals[n].weights[KERNEL].ravel(), finals[n].weights[BIAS]] for n in honest}
    for n in honest:
        assert np.isfinite(heads[n]).all()
        np.testing.assert_allclose(heads[n], heads[honest[0]], atol=1e-4)
        assert np.linalg.norm(heads[n]) <= steps * MAX_STEP * (1 + 1e-5)  # from a head of zeros


def _topology(extra_gossip="", extra=""):
    text = ('federation = "f"\nprotocol = "gossip"\n[network]\ninsecure = true\n[gossip]\nsecure = false\n'
            + extra_gossip + extra + '[[peers]]\nname = "a"\n[[peers]]\nname = "b"\n[[peers]]\nname = "c"\n')
    return parse_topology(tomllib.loads(text))


@pytest.mark.pure
def test_a_refit_that_would_leak_or_could_not_average_is_refused_in_one_line():
    assert _topology("head_refit_steps = 5\n").gossip.head_refit_steps == 5
    with pytest.raises(ConfigError, match="DP-SGD's noise does not cover"):
        _topology("head_refit_steps = 5\n", "[privacy]\nenabled = true\ntarget_epsilon = 8.0\n")
    with pytest.raises(ConfigError, match="needs the mean"):
        _topology('head_refit_steps = 5\naggregation = "median"\n')
    with pytest.raises(ConfigError, match="needs the complete graph"):
        _topology('head_refit_steps = 5\ngraph = "edges"\nedges = [["a", "b"], ["b", "c"]]\n')
    with pytest.raises(ConfigError, match=">= 0"):
        _topology("head_refit_steps = -1\n")
    head = _spec_of_head(2)
    assert refit_applies(head, {"a": 200, "b": 45}) is None  # 245 >= 35 x 7 parameters
    assert "fewer than 35 per head parameter" in refit_applies(head, {"a": 200, "b": 44})
    assert "gossip.samples is not listed" in refit_applies(head, {})
    with pytest.raises(ValueError, match="no `head` Linear layer"):
        statistics_spec([("dense/kernel", "float32", (4, 1)), ("dense/bias", "float32", (1,))])


def _mix(loss, head):
    """A refit round's average as the skeleton hands it over: the model, and statistics whose
    pooled validation loss is `loss` (a zero gradient: a step stays where it is)."""
    stats = zero_statistics(_spec_of_head(2))
    stats[VALIDATION] = np.array([loss, 1.0], np.float32)
    return {**head, **stats}


@pytest.mark.pure
def test_the_head_kept_is_the_one_with_the_lowest_pooled_validation_loss_also_across_a_restart():
    heads = [{**_head(2, v), **zero_statistics(_spec_of_head(2))} for v in (0.0, 0.5, 1.0)]
    refit = HeadRefit(2)
    assert refit.rounds == 3
    model, record = refit.step(heads[0], _mix(0.30, heads[0]), usable=True, last=False)
    assert record["head_refit_validation_loss"] == pytest.approx(0.30)
    # The site restarts from its checkpoint between rounds: the best head so far comes back.
    restored = HeadRefit(2)
    restored.restore(refit.snapshot())
    model, record = restored.step(heads[1], _mix(0.50, heads[1]), usable=True, last=False)
    model, record = restored.step(heads[2], _mix(0.60, heads[2]), usable=True, last=True)
    np.testing.assert_array_equal(model[KERNEL], heads[0][KERNEL])  # the refit overfitted: the trained head stays
    assert record["head_refit_kept_step"] == 0 and not model[VALIDATION].any()
    # A failed sum scores nothing and takes no step.
    fresh = HeadRefit(1)
    model, record = fresh.step(heads[1], _mix(0.1, heads[1]), usable=False, last=False)
    assert record["head_refit"] == "skipped" and fresh.best is None and fresh.taken == 0
    # An average with no validation images scores nothing a metrics line cannot hold.
    no_validation = _mix(0.1, heads[1])
    no_validation[VALIDATION] = np.zeros(2, np.float32)
    model, record = fresh.step(heads[1], no_validation, usable=True, last=False)
    assert record["head_refit_validation_loss"] is None and json.dumps(record, allow_nan=False)


@pytest.mark.parametrize("kill", [None, "hospital-02:2:sum:2"], ids=["whole", "killed-in-a-refit-sum"])
def test_the_shipped_gossip_10_refits_the_head_of_real_sites(tmp_path, kill):
    """Real sites (the node's Site, driver, secure chunked sums, checkpoints; the in-process
    engine) on the embedded PneumoniaMNIST, 5 sites of the shipped gossip-10 for 1 round:
    the refit rounds run, every site scores the same heads and keeps the same one. Killed
    inside a refit round's sum and back two rounds later from its checkpoint, a site still
    finishes (exit 0), the others skip the rounds whose average missed its slice and end
    identical."""
    topology = shipped_topology(tmp_path, "gossip-10.toml")
    out = tmp_path / "out"
    proc = p2p_fl("launch", str(topology), "--out", str(out), "--peers", "5", "--rounds", "1", "--local-epochs", "1",
                  "--engine", "inproc", *(["--kill", kill] if kill else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head_refit_steps"] == 5 and "head refit x5" in proc.stdout
    names = [n["name"] for n in summary["nodes"]]
    healthy = [n for n in names if not kill or not kill.startswith(n)]
    finals = {n: dict(np.load(out / n / "final_model.npz")) for n in names}
    assert not any(k.startswith("head_refit/") for k in finals[names[0]])  # statistics never reach a model file
    for n in healthy:
        for k in finals[n]:
            np.testing.assert_allclose(finals[n][k], finals[healthy[0]][k], atol=1e-5)
        records = [json.loads(line) for line in (out / n / "metrics.jsonl").read_text().splitlines()]
        scored = [r["head_refit_validation_loss"] for r in records if "head_refit_validation_loss" in r]
        skipped = [r for r in records if r.get("head_refit") == "skipped"]
        # Each refit round scores the head after as many steps as were taken, then steps; a
        # round whose average missed a slice (the victim's, while it was down) does neither.
        assert len(scored) + len(skipped) == 6 and all(np.isfinite(scored)), records
        assert all(r["chunks_missing"] for r in skipped) and (kill or not skipped), skipped
        kept = records[-1]["head_refit_kept_step"]
        assert scored[kept] == min(scored)
    if kill:
        victim = json.loads((out / kill.split(":")[0] / "result.json").read_text())
        assert victim["resumes"] == 1
