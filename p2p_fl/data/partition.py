"""Split a dataset into per-site shards to simulate a federation: IID, label skew, size skew.

Every function is reproducible: `seed` is anything `np.random.default_rng` accepts (an int, or
a Generator that is then advanced). Index arrays returned are sorted, disjoint and together
cover every sample.
"""

from __future__ import annotations

import math

import numpy as np

from p2p_fl.data.sources import Dataset, Split

PARTITION_FORMS = "'iid', 'dirichlet:ALPHA' or 'quantity:ALPHA' with ALPHA > 0 (e.g. 'dirichlet:0.5')"
# Rejection sampling for min_size: each draw costs microseconds; past this, the request is
# unrealistic (alpha too small for that many parts) and the caller should change it.
MAX_DRAWS = 10_000

Seed = int | np.random.Generator


def iid(labels: np.ndarray, num_parts: int, seed: Seed) -> list[np.ndarray]:
    """Shuffle and deal samples into parts of (nearly) equal size.

    Args:
        labels: (N,) class ids (only their count matters).
        num_parts: number of parts.
        seed: int or np.random.Generator.

    Returns:
        num_parts sorted index arrays whose sizes differ by at most 1.
    """
    _check_num_parts(num_parts)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_parts)]


def dirichlet(labels: np.ndarray, num_parts: int, alpha: float, seed: Seed,
              min_size: int = 10) -> list[np.ndarray]:
    """Label skew: each class is spread over the parts in proportions drawn from Dir(alpha).

    Small alpha (0.1) gives parts dominated by one class; large alpha (100) approaches IID.
    Draws are repeated until every part holds at least min_size samples.

    Args:
        labels: (N,) class ids.
        num_parts: number of parts.
        alpha: Dirichlet concentration, > 0.
        seed: int or np.random.Generator.
        min_size: smallest acceptable part.

    Returns:
        num_parts sorted index arrays.

    Raises:
        ValueError: no draw in MAX_DRAWS satisfied min_size.
    """
    return _skewed(labels, num_parts, "dirichlet", alpha, seed, min_size)


def quantity_skew(labels: np.ndarray, num_parts: int, alpha: float, seed: Seed,
                  min_size: int = 10) -> list[np.ndarray]:
    """Size skew: part sizes in proportions drawn from Dir(alpha), labels mixed within parts.

    Each class is divided in the same proportions (stratified), so every part's class mix is
    close to the global one and only the sizes differ.

    Args:
        labels: (N,) class ids.
        num_parts: number of parts.
        alpha: Dirichlet concentration, > 0; small values give very unequal sizes.
        seed: int or np.random.Generator.
        min_size: smallest acceptable part.

    Returns:
        num_parts sorted index arrays.

    Raises:
        ValueError: no draw in MAX_DRAWS satisfied min_size.
    """
    return _skewed(labels, num_parts, "quantity", alpha, seed, min_size)


def parse_partition(spec: str) -> tuple[str, float | None]:
    """Parse a partition spec.

    Args:
        spec: "iid", "dirichlet:ALPHA" or "quantity:ALPHA".

    Returns:
        (kind, alpha): ("iid", None), ("dirichlet", alpha) or ("quantity", alpha).

    Raises:
        ValueError: any other spec; the message lists the valid forms.
    """
    kind, _, param = spec.strip().lower().partition(":")
    if kind == "iid" and not param:
        return "iid", None
    if kind in ("dirichlet", "quantity"):
        try:
            alpha = float(param)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return kind, alpha
    raise ValueError(f"bad partition {spec!r}: use {PARTITION_FORMS}")


def partition_dataset(dataset: Dataset, num_parts: int, spec: str = "iid", seed: Seed = 0,
                      min_size: int = 10) -> list[Dataset]:
    """Split a dataset into per-site datasets, each with local train, val and test shards.

    The same scheme covers all three splits so that a site's val and test look like its train:
    for dirichlet, one classes x parts proportion matrix is drawn (satisfying min_size on the
    train split) and applied to every split; for quantity, one size vector. Every part gets at
    least one val and one test sample whenever the split has at least num_parts samples (moved
    from the part richest in the class the part holds most of).

    Args:
        dataset: the dataset to split.
        num_parts: number of sites.
        spec: partition spec, see `parse_partition`.
        seed: int or np.random.Generator.
        min_size: smallest train shard for the skewed schemes.

    Returns:
        num_parts datasets named "{name}-part{i}", each with the parent's num_classes.

    Raises:
        ValueError: bad spec, fewer train samples than sites, or min_size unreachable.
    """
    kind, alpha = parse_partition(spec)
    _check_num_parts(num_parts)
    if len(dataset.train) < num_parts:
        raise ValueError(f"cannot give {num_parts} sites a train shard from {len(dataset.train)} samples")
    rng = np.random.default_rng(seed)
    splits = (dataset.train, dataset.val, dataset.test)
    if kind == "iid":
        index_sets = [iid(split.labels, num_parts, rng) for split in splits]
    else:
        train_sizes = _class_sizes(dataset.train.labels, dataset.num_classes)
        proportions = _draw_proportions(kind, train_sizes, num_parts, alpha, rng, min_size)
        index_sets = []
        for split in splits:
            counts = _allocate(_class_sizes(split.labels, dataset.num_classes), proportions)
            index_sets.append(_assign(split.labels, _fill_empty_parts(counts, proportions), rng))
    return [
        Dataset(
            *(_subset(split, parts[i]) for split, parts in zip(splits, index_sets)),
            num_classes=dataset.num_classes,
            name=f"{dataset.name}-part{i}",
            class_names=dataset.class_names,
        )
        for i in range(num_parts)
    ]


def subsample(dataset: Dataset, train_images: int, seed: Seed = 0) -> Dataset:
    """The dataset with `train_images` of its training images (0: all), drawn class by class
    in proportion (seeded), and its validation split cut by the same ratio; the test split
    stays whole, so that a small-data study is still scored on every test image.

    Raises:
        ValueError: more images asked for than the training split holds.
    """
    if not train_images or train_images == len(dataset.train):
        return dataset
    if not 0 < train_images < len(dataset.train):
        raise ValueError(f"data.train_images {train_images}: the training split holds {len(dataset.train)}")
    rng = np.random.default_rng(seed)
    ratio = train_images / len(dataset.train)

    def cut(split: Split, keep: int) -> Split:
        if keep >= len(split):
            return split
        exact = _class_sizes(split.labels, dataset.num_classes) * keep / len(split)
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact)[:keep - counts.sum()]] += 1  # the largest remainders
        index = np.concatenate([rng.choice(np.flatnonzero(split.labels == c), n, replace=False)
                                for c, n in enumerate(counts) if n > 0])
        return _subset(split, np.sort(index))

    return Dataset(cut(dataset.train, train_images), cut(dataset.val, max(1, round(len(dataset.val) * ratio))),
                   dataset.test, num_classes=dataset.num_classes, name=f"{dataset.name}-{train_images}",
                   class_names=dataset.class_names)


def label_histogram(dataset_or_labels: Dataset | Split | np.ndarray,
                    num_classes: int | None = None) -> np.ndarray:
    """Count samples per class.

    Args:
        dataset_or_labels: a Dataset (its train split is counted), a Split, or labels (N,).
        num_classes: length of the histogram; defaults to the dataset's num_classes, or the
            largest label + 1 for a Split or an array.

    Returns:
        int64 array (num_classes,) of counts.
    """
    if isinstance(dataset_or_labels, Dataset):
        num_classes = num_classes or dataset_or_labels.num_classes
        dataset_or_labels = dataset_or_labels.train
    if isinstance(dataset_or_labels, Split):
        dataset_or_labels = dataset_or_labels.labels
    labels = np.asarray(dataset_or_labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return _class_sizes(labels, num_classes)


def _subset(split: Split, index: np.ndarray) -> Split:
    return Split(split.images[index], split.labels[index])


def _check_num_parts(num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")


def _class_sizes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def _skewed(labels: np.ndarray, num_parts: int, kind: str, alpha: float, seed: Seed,
            min_size: int) -> list[np.ndarray]:
    _check_num_parts(num_parts)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    sizes = _class_sizes(labels, int(labels.max()) + 1 if labels.size else 0)
    proportions = _draw_proportions(kind, sizes, num_parts, alpha, rng, min_size)
    return _assign(labels, _allocate(sizes, proportions), rng)


def _draw_proportions(kind: str, class_sizes: np.ndarray, num_parts: int, alpha: float,
                      rng: np.random.Generator, min_size: int) -> np.ndarray:
    """Draw a classes x parts matrix (rows sum to 1) whose allocation meets min_size."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    total = int(class_sizes.sum())
    if total < num_parts * min_size:
        raise ValueError(
            f"{total} samples cannot give {num_parts} parts {min_size} each; lower min_size or num_parts"
        )
    concentration = np.full(num_parts, alpha)
    for _ in range(MAX_DRAWS):
        if kind == "dirichlet":
            proportions = rng.dirichlet(concentration, size=len(class_sizes))
        else:
            proportions = np.tile(rng.dirichlet(concentration), (len(class_sizes), 1))
        if _allocate(class_sizes, proportions).sum(axis=0).min() >= min_size:
            return proportions
    raise ValueError(
        f"{kind}:{alpha} gave a part under {min_size} samples in {MAX_DRAWS} draws "
        f"({total} samples, {num_parts} parts); use a larger alpha, fewer parts or a smaller min_size"
    )


def _allocate(class_sizes: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Integer classes x parts counts with row sums class_sizes, closest to the proportions.

    Largest-remainder rounding per class: no class loses or gains samples.
    """
    exact = proportions * class_sizes[:, None]
    counts = np.floor(exact).astype(np.int64)
    shortfall = class_sizes - counts.sum(axis=1)
    # Rank the parts of each class by fractional remainder, largest first.
    ranks = np.argsort(np.argsort(counts - exact, axis=1, kind="stable"), axis=1, kind="stable")
    return counts + (ranks < shortfall[:, None])


def _fill_empty_parts(counts: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Move single samples so no part is empty, where the split has enough samples.

    An empty part takes a sample of the class it has the largest proportion of (so its mix
    stays as drawn) from the part holding most of that class, never emptying the donor.
    """
    counts = counts.copy()
    for part in np.flatnonzero(counts.sum(axis=0) == 0):
        totals = counts.sum(axis=0)
        for label in np.argsort(-proportions[:, part], kind="stable"):
            donors = (counts[label] > 0) & (totals > 1)
            if donors.any():
                donor = np.argmax(np.where(donors, counts[label], -1))
                counts[label, donor] -= 1
                counts[label, part] += 1
                break
    return counts


def _assign(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal each class's samples, shuffled, to the parts by the classes x parts counts."""
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    num_classes, num_parts = counts.shape
    part_of = np.repeat(np.tile(np.arange(num_parts), num_classes), counts.ravel())
    return [np.sort(by_class[part_of == part]) for part in range(num_parts)]
