"""Data layer: load datasets from files and split them into per-site shards."""

from p2p_fl.data.partition import (
    dirichlet,
    iid,
    label_histogram,
    parse_partition,
    partition_dataset,
    quantity_skew,
    subsample,
)
from p2p_fl.data.sources import (
    BUILTIN,
    DataError,
    Dataset,
    Split,
    load_dataset,
    load_image_folder,
    load_npz,
    load_test_like,
    save_npz,
)

__all__ = [
    "BUILTIN",
    "DataError",
    "Dataset",
    "Split",
    "dirichlet",
    "iid",
    "label_histogram",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_test_like",
    "parse_partition",
    "partition_dataset",
    "quantity_skew",
    "subsample",
    "save_npz",
]
