"""Splitting data into per-site shards: IID, label skew (Dirichlet) and quantity skew."""

import numpy as np
import pytest

from p2p_fl.data import (
    Dataset,
    Split,
    dirichlet,
    iid,
    label_histogram,
    load_dataset,
    parse_partition,
    partition_dataset,
    quantity_skew,
    subsample,
)

SCHEMES = {
    "iid": lambda labels, seed: iid(labels, 5, seed),
    "dirichlet:0.1": lambda labels, seed: dirichlet(labels, 5, 0.1, seed),
    "dirichlet:1": lambda labels, seed: dirichlet(labels, 5, 1.0, seed),
    "quantity:0.5": lambda labels, seed: quantity_skew(labels, 5, 0.5, seed),
}


@pytest.fixture(scope="module")
def pneumonia():
    return load_dataset("pneumoniamnist")


def majority_fraction(labels, parts):
    """Mean over parts of the share of the part's most common class."""
    return np.mean([np.bincount(labels[part]).max() / len(part) for part in parts])


def tiny_dataset(rng, sizes=(200, 5, 7), num_classes=3):
    def split(n):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        return Split(rng.random((n, 2, 2, 1), dtype=np.float32), labels)

    return Dataset(*(split(n) for n in sizes), num_classes=num_classes, name="tiny")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parts_are_disjoint_complete_and_sorted(pneumonia, scheme):
    labels = pneumonia.train.labels
    parts = SCHEMES[scheme](labels, 0)
    assert len(parts) == 5
    everything = np.concatenate(parts)
    assert len(everything) == len(labels)  # disjoint: no index twice...
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # ...and all of them
    assert all(np.all(np.diff(part) > 0) for part in parts)
    assert min(len(part) for part in parts) >= 10  # min_size


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_parts_other_seed_other_parts(pneumonia, scheme):
    labels = pneumonia.train.labels
    first, again, other = (SCHEMES[scheme](labels, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(part) for part in iid(np.zeros(103, np.int32), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_small_alpha_skews_labels_measurably(pneumonia):
    labels = pneumonia.train.labels
    iid_majority = majority_fraction(labels, iid(labels, 5, seed=0))
    skewed_majority = majority_fraction(labels, dirichlet(labels, 5, alpha=0.1, seed=0))
    assert iid_majority == pytest.approx(0.74, abs=0.03)  # the global pneumonia share
    assert skewed_majority > iid_majority + 0.15


def test_quantity_skew_gives_unequal_sizes_with_the_global_class_mix(pneumonia):
    labels = pneumonia.train.labels
    parts = quantity_skew(labels, 5, alpha=0.5, seed=0)
    sizes = np.array([len(part) for part in parts])
    assert sizes.max() > 3 * sizes.min()
    global_share = labels.mean()
    for part in parts:
        assert labels[part].mean() == pytest.approx(global_share, abs=0.05)


def test_unreachable_min_size_is_a_clear_error(pneumonia):
    with pytest.raises(ValueError, match="larger alpha, fewer parts or a smaller min_size"):
        dirichlet(pneumonia.train.labels, 40, alpha=0.05, seed=0)
    with pytest.raises(ValueError, match="cannot give"):
        quantity_skew(np.zeros(30, np.int32), 4, alpha=1.0, seed=0)


@pytest.mark.parametrize(
    "spec, expected",
    [("iid", ("iid", None)), ("dirichlet:0.5", ("dirichlet", 0.5)), (" Quantity:1.0", ("quantity", 1.0))],
)
def test_parse_partition_accepts_documented_forms(spec, expected):
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "dirichlet", "dirichlet:-1", "dirichlet:abc", "quantity:nan", "iid:2", "shards:2"]
)
def test_parse_partition_error_lists_valid_forms(spec):
    with pytest.raises(ValueError) as error:
        parse_partition(spec)
    message = str(error.value)
    assert "'iid', 'dirichlet:ALPHA' or 'quantity:ALPHA'" in message and "\n" not in message


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "quantity:1.0"])
def test_partition_dataset_covers_every_split_and_keeps_num_classes(pneumonia, spec):
    sites = partition_dataset(pneumonia, 4, spec, seed=0)
    assert [site.name for site in sites] == [f"pneumoniamnist-part{i}" for i in range(4)]
    assert all(site.num_classes == 2 and site.image_shape == (28, 28, 1) for site in sites)
    for split in ("train", "val", "test"):
        assert sum(len(getattr(site, split)) for site in sites) == len(getattr(pneumonia, split))
        # Every sample lands at one site: the pooled labels are a permutation of the original's.
        pooled = np.concatenate([label_histogram(getattr(site, split), 2)[None] for site in sites])
        np.testing.assert_array_equal(pooled.sum(axis=0), label_histogram(getattr(pneumonia, split), 2))


def test_each_site_gets_the_same_share_of_each_class_in_train_and_test(pneumonia):
    sites = partition_dataset(pneumonia, 4, "dirichlet:0.3", seed=2)
    train_totals = label_histogram(pneumonia.train)
    test_totals = label_histogram(pneumonia.test, 2)
    for site in sites:
        train_share = label_histogram(site.train) / train_totals
        test_share = label_histogram(site.test, 2) / test_totals
        np.testing.assert_allclose(test_share, train_share, atol=0.02)


def test_small_val_and_test_splits_leave_no_site_empty():
    data = tiny_dataset(np.random.default_rng(0), sizes=(200, 5, 7))
    for spec in ("iid", "dirichlet:0.1", "quantity:0.3"):
        sites = partition_dataset(data, 5, spec, seed=1, min_size=5)
        assert [len(site.val) for site in sites] == [1] * 5
        assert all(len(site.test) >= 1 for site in sites)
        assert all(site.num_classes == 3 for site in sites)


def test_label_histogram_counts_every_class_even_absent_ones():
    assert label_histogram(np.array([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    data = tiny_dataset(np.random.default_rng(0))
    assert label_histogram(data).sum() == len(data.train) and len(label_histogram(data)) == 3


def test_subsample_keeps_the_class_mix_cuts_val_alike_and_keeps_the_whole_test_split(pneumonia):
    small = subsample(pneumonia, 300, seed=0)
    assert len(small.train) == 300 and len(small.test) == len(pneumonia.test)
    assert len(small.val) == round(len(pneumonia.val) * 300 / len(pneumonia.train))
    full, kept = (np.bincount(d.train.labels) / len(d.train) for d in (pneumonia, small))
    np.testing.assert_allclose(kept, full, atol=1 / 300)  # class by class, rounding aside
    rows = {bytes(image) for image in pneumonia.train.images.reshape(len(pneumonia.train), -1)}
    assert all(bytes(image) in rows for image in small.train.images.reshape(300, -1))
    again, other = subsample(pneumonia, 300, seed=0), subsample(pneumonia, 300, seed=1)
    np.testing.assert_array_equal(again.train.images, small.train.images)
    assert not np.array_equal(other.train.images, small.train.images)
    assert subsample(pneumonia, 0) is pneumonia
    with pytest.raises(ValueError, match="train_images"):
        subsample(pneumonia, len(pneumonia.train) + 1)
