"""Refitting the shared model's head on every site's data at once: Newton steps through the sums.

Under label skew the features a federation learns are as good as pooled training's, but its
head is not (docs/results.md, "Where the gap is"): a logistic regression refitted on the
pooled training features takes the federated model most of the way to pooled training. The
head's loss is convex in the head alone, and its gradient and Hessian are means over the
examples, so a weighted average of every site's own means is the pooled one. After the last
training round, `[gossip] head_refit_steps` + 1 rounds each send, instead of a trained
model, the head's gradient and Hessian on the site's training images at the model it holds;
the round's average (secure sum or plain mean, sample-count weights, the complete graph)
gives every site the same pooled statistics, and every site takes the same Newton step: the
body stays as it is, the head moves to the pooled fit (gossip-10, seed 0: steps of 3.8, 1.5,
0.7, 0.5, 0.09 in norm).

Which head is kept is chosen on validation data, alike at every site: each refit round also
sends the validation loss at the head it holds (its sum over the site's validation images
and their count, both per training image, so that the sample-count weighted averages give
the pooled mean), and after the last step's round (`steps` + 1 rounds in all) every site
keeps, of the trained head and the heads of the steps, the one with the lowest pooled
validation loss. It does not guard against overfitting a small pooled set (validation images
come from the training distribution): `refit_applies` does, by the pooled set's size.

What travels: the head's gradient (P values) and the upper triangles of its Hessian blocks,
P = classes x (features + 1). One logit (two classes): the exact Hessian. More classes: one
block per class (the diagonal blocks of the softmax Hessian; the off-diagonal ones would be
P^2 values), which the ridge and the step cap keep a descent step.

All are sent times `STATISTICS_SCALE` (a Newton step does not change when gradient and
Hessian are scaled alike): p(1 - p) x_j x_k <= x^2 / 4, so features up to 16 in magnitude
give scaled Hessian entries within the secure sum's default clip (16).

Against a dishonest site (docs/protocols.md, "Head refit"): it can put any statistics in
the average; each site makes the averaged Hessian positive semi-definite, adds a ridge, and
caps each step at `MAX_STEP` in norm, so one refit step moves every honest site's head by
at most `MAX_STEP`, whatever was sent.
"""

from __future__ import annotations

import numpy as np

KERNEL, BIAS = "head/kernel", "head/bias"
GRADIENT, HESSIAN = "head_refit/gradient", "head_refit/hessian"
VALIDATION = "head_refit/validation"  # [validation loss sum, validation images], each / training images
PREFIX = "head_refit/"
STATISTICS_SCALE = 0.25
# The ridge on the kernel, relative to the Hessian's mean diagonal: makes the problem well
# posed where features are dead (a ReLU unit that is zero on every image gives a zero row).
RIDGE = 1e-3
# The refit runs only where the pooled training set holds at least this many images per head
# parameter (gossip.samples, summed). For small-cnn's 129 (docs/results.md, "The head refit";
# 10 label-skewed sites unless said): 4,707 images (36 a parameter) gained on 3 seeds of 4
# (+0.0009 to +0.0067, -0.0005 on the fourth); 2,600 (20) lost on 2 of 3 (-0.012, -0.005,
# +0.0014); 300 over 3 sites separated the pooled set and lost on 4 of 6 (6 of 6 without
# the validation choice).
MIN_IMAGES_PER_PARAMETER = 35
# At most this far (Euclidean norm over the head's parameters) per refit step. Honest steps
# measured on gossip-10 (seed 0): 3.8, 1.5, 0.7, 0.5, 0.09; seed 5: 3.4, 0.6, 0.2, 0.05.
MAX_STEP = 4.0


def head_shape(weight_spec) -> tuple[int, int]:
    """(features, logits) of a model's head, from its weight spec.

    Raises:
        ValueError: the model has no `head` Linear layer (kernel (F, C), bias (C,)).
    """
    shapes = {name: tuple(shape) for name, _, shape in weight_spec}
    kernel, bias = shapes.get(KERNEL), shapes.get(BIAS)
    if kernel is None or bias is None or len(kernel) != 2 or bias != (kernel[1],):
        raise ValueError("the model has no `head` Linear layer (head/kernel (F, C) and head/bias (C,))")
    return kernel


def refit_applies(weight_spec, samples: dict[str, int]) -> str | None:
    """None if the refit can run on this model and these listed training samples, else why not.

    Raises:
        ValueError: the model has no `head` Linear layer.
    """
    features, logits = head_shape(weight_spec)
    parameters = (features + 1) * logits
    if not samples:
        return "gossip.samples is not listed: the sites' statistics cannot be weighted into the pooled ones"
    pooled = sum(samples.values())
    if pooled < MIN_IMAGES_PER_PARAMETER * parameters:
        return (f"{pooled} pooled training images are fewer than {MIN_IMAGES_PER_PARAMETER} per head parameter "
                f"({MIN_IMAGES_PER_PARAMETER} x {parameters}): a pooled fit of the head would overfit them")
    return None


def statistics_spec(weight_spec) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors a refit round sends beside the model: (name, dtype, shape), sorted."""
    features, logits = head_shape(weight_spec)
    block = features + 1
    return [(GRADIENT, "float32", (logits * block,)), (HESSIAN, "float32", (logits, block * (block + 1) // 2)),
            (VALIDATION, "float32", (2,))]


def zero_statistics(weight_spec) -> dict[str, np.ndarray]:
    """What a training round sends in the statistics' place."""
    return {name: np.zeros(shape, dtype) for name, dtype, shape in statistics_spec(weight_spec)}


def _probabilities(features, labels, kernel, bias):
    """(inputs with a 1 appended, probabilities (N, C), one-hot targets (N, C), losses (N,))."""
    x = np.hstack([features.astype(np.float64).reshape(len(features), -1), np.ones((len(features), 1))])
    logits = x @ np.vstack([kernel, bias[None, :]]).astype(np.float64)
    labels = np.asarray(labels).ravel().astype(int)
    if kernel.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits))
        targets = (labels == 1).astype(np.float64)[:, None]
        losses = np.logaddexp(0, logits[:, 0]) - targets[:, 0] * logits[:, 0]
    else:
        shifted = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        targets = np.eye(kernel.shape[1])[labels]
        losses = -np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-300))
    return x, p, targets, losses


def head_statistics(features: np.ndarray, labels: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                    validation: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """The head's mean gradient and Hessian blocks on one site's training examples and its
    validation loss, scaled to send, and the mean training loss (binary or softmax
    cross-entropy) at this head.

    Args:
        features: (N, F) the head's inputs (the model in inference mode).
        labels: (N,) class indices.
        kernel, bias: the head, (F, C) and (C,); C = 1 for two classes.
        validation: (features, labels) of the site's validation images, or None (none).
    """
    x, p, targets, losses = _probabilities(features, labels, kernel, bias)
    loss = float(np.mean(losses)) if len(losses) else 0.0
    n = max(len(x), 1)
    val_sum, val_count = 0.0, 0
    if validation is not None and len(validation[1]):
        val_sum, val_count = float(np.sum(_probabilities(*validation, kernel, bias)[3])), len(validation[1])
    gradient = ((p - targets).T @ x / n).ravel()  # class by class: [kernel[:, c], bias[c]]
    upper = np.triu_indices(x.shape[1])
    hessian = np.stack([((x * (p[:, c] * (1 - p[:, c]))[:, None]).T @ x / n)[upper] for c in range(p.shape[1])])
    scaled = {GRADIENT: (STATISTICS_SCALE * gradient).astype(np.float32),
              HESSIAN: (STATISTICS_SCALE * hessian).astype(np.float32),
              VALIDATION: (STATISTICS_SCALE * np.array([val_sum, val_count]) / n).astype(np.float32)}
    return scaled, loss


def pooled_validation_loss(validation: np.ndarray) -> float:
    """The pooled validation loss from an average of `head_statistics`' VALIDATION (inf: none)."""
    total, count = (float(v) for v in validation)
    return total / count if 0 < count < np.inf and np.isfinite(total) else float("inf")


def newton_step(kernel: np.ndarray, bias: np.ndarray, gradient: np.ndarray,
                hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One Newton step of the ridge-regularised head loss from averaged statistics.

    Each block's Hessian is made positive semi-definite (negative eigenvalues to 0) and gets
    the ridge, so the step is a descent step whatever the average holds; the step is cut to
    `MAX_STEP` in norm. Returns (kernel, bias, the step's norm before the cut).
    """
    features, logits = kernel.shape
    block = features + 1
    if not (np.isfinite(gradient).all() and np.isfinite(hessian).all()):
        return kernel, bias, float("inf")  # an average that overflowed (plain sums of huge values): no step
    head = np.vstack([kernel, bias[None, :]]).astype(np.float64)  # (F + 1, C)
    gradient = np.asarray(gradient, np.float64).reshape(logits, block)
    upper = np.triu_indices(block)
    step = np.zeros_like(head)
    for c in range(logits):
        h = np.zeros((block, block))
        h[upper] = hessian[c]
        h = h + np.triu(h, 1).T
        values, vectors = np.linalg.eigh(h)
        h = (vectors * np.maximum(values, 0)) @ vectors.T
        ridge = RIDGE * max(float(np.mean(np.diag(h)[:-1])), 0.0) + 1e-12
        penalty = np.r_[np.full(features, ridge), 1e-9 * ridge]  # the bias barely penalised
        step[:, c] = np.linalg.solve(h + np.diag(penalty), gradient[c] + penalty * head[:, c])
    norm = float(np.linalg.norm(step))
    if not np.isfinite(norm):
        return kernel, bias, norm  # nothing usable in the average: the head stays
    if norm > MAX_STEP:
        step *= MAX_STEP / norm
    head = head - step
    return head[:-1].astype(kernel.dtype), head[-1].astype(bias.dtype), norm


def _finite_or_none(value: float) -> float | None:
    """For a record (metrics.jsonl): JSON has no infinity."""
    return value if np.isfinite(value) else None


class HeadRefit:
    """The refit rounds' step for the gossip skeleton: `step(start, mix, usable, last)` -> model.

    `start` is the model the refit round started from (the site's, statistics zero), `mix`
    the round's average with the pooled statistics. Every site holds the same start and the
    same average on the complete graph, so every site takes the same steps and keeps the
    same head. The best head so far (by pooled validation loss) and the steps taken are
    state: `snapshot`/`restore` put them in the checkpoint.
    """

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"a head refit needs at least 1 step, got {steps}")
        self.steps = steps
        self.rounds = steps + 1  # the last round only scores the last step's head
        self.taken = 0  # Newton steps taken: the head a round starts from is after this many
        self.best: tuple[float, np.ndarray, np.ndarray, int] | None = None  # (loss, kernel, bias, steps)

    def step(self, start: dict[str, np.ndarray], mix: dict[str, np.ndarray], usable: bool,
             last: bool) -> tuple[dict, dict]:
        """The next model and what the round did (for its record). Not `usable` (the sum
        failed and the site kept its own statistics, or a rejoining mix): no score and no
        step, the model is the mix's (a regular round's is `start`). `last`: instead of a
        step, the model gets the best head scored."""
        model = {name: (np.zeros_like(value) if name.startswith(PREFIX) else value)
                 for name, value in (start if usable else mix).items()}
        record: dict = {}
        if usable:
            loss = pooled_validation_loss(mix[VALIDATION])
            record["head_refit_validation_loss"] = _finite_or_none(loss)
            if self.best is None or loss < self.best[0]:
                self.best = (loss, start[KERNEL].copy(), start[BIAS].copy(), self.taken)
        else:
            record["head_refit"] = "skipped"
        if last:
            if self.best is not None and np.isfinite(self.best[0]):
                model[KERNEL], model[BIAS] = self.best[1], self.best[2]
                record["head_refit_kept_step"] = self.best[3]  # 0: the trained head
            return model, record
        if usable:
            kernel, bias, norm = newton_step(start[KERNEL], start[BIAS], mix[GRADIENT], mix[HESSIAN])
            model[KERNEL], model[BIAS] = kernel, bias
            self.taken += 1
            record.update(head_refit_step_norm=_finite_or_none(norm), head_refit_capped=bool(norm > MAX_STEP))
        return model, record

    def snapshot(self) -> dict[str, np.ndarray]:
        arrays = {"head_refit_state/taken": np.array([self.taken])}
        if self.best is not None:
            loss, kernel, bias, steps = self.best
            arrays.update({"head_refit_state/best": np.array([loss, steps], np.float64),
                           "head_refit_state/kernel": kernel, "head_refit_state/bias": bias})
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.taken = int(arrays.get("head_refit_state/taken", np.array([0]))[0])
        self.best = None
        if "head_refit_state/best" in arrays:
            loss, steps = arrays["head_refit_state/best"]
            self.best = (float(loss), arrays["head_refit_state/kernel"], arrays["head_refit_state/bias"], int(steps))
