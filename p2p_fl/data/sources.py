"""Load image classification data from MedMNIST-style .npz files or folders of PNG/JPEG/DICOM images.

Every loader returns a `Dataset` of float32 images in [0, 1] shaped (N, H, W, C) and int32
labels shaped (N,). Every problem with a user's file raises `DataError`, whose message is one
line naming the file, what is wrong with it and what to do.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from p2p_fl.data.dicom import UnreadableDicom, is_dicom, read_dicom

log = logging.getLogger(__name__)

BUILTIN = {"pneumoniamnist": Path(__file__).with_name("pneumoniamnist.npz")}
# MedMNIST's label names for the builtin sets (their .npz files carry none).
BUILTIN_CLASSES = {"pneumoniamnist": ("normal", "pneumonia")}

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Carved from train when an .npz has no val split (stratified, fixed seed: reproducible).
NPZ_VAL_FRACTION = 0.1
NPZ_VAL_SEED = 0

# ITU-R 601-2 luma weights, the same as Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Modes Pillow gives 16-bit grayscale PNGs ("I" in older Pillow versions).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_BILINEAR = Image.Resampling.BILINEAR


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: float32 array (N, H, W, C) with values in [0, 1].
        labels: int32 array (N,) of class ids.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"Split needs images (N, H, W, C) and labels (N,), got {self.images.shape} "
                f"and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits of one image classification dataset.

    Attributes:
        train: training split.
        val: validation split.
        test: test split.
        num_classes: number of classes; labels lie in [0, num_classes). A shard keeps its
            parent's value even when it lacks some classes.
        name: short human-readable name (file stem, folder name or shard name).
        skipped: files the loader skipped (unreadable images or DICOMs, each logged); the
            number skipped is len(skipped). Empty for .npz files and shards.
        class_names: the name of each class id, in order (folder names, CSV labels or a
            topology's data.classes); empty when the source names none (a bare .npz).
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str
    skipped: tuple[Path, ...] = ()
    class_names: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.train.images.shape[1:])

    def describe(self) -> str:
        """One line for a site's log: sizes, image shape, each class's name and train count."""
        h, w, c = self.image_shape
        counts = np.bincount(self.train.labels, minlength=self.num_classes)
        names = self.class_names or ("",) * self.num_classes
        classes = ", ".join(f"{i} {name}: {n}".replace(" :", ":") for i, (name, n) in enumerate(zip(names, counts)))
        return (f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test images "
                f"of {h}x{w}x{c}; train images per class: {classes}")


def load_test_like(spec: str, like: Dataset) -> Split:
    """The test split of `spec` as a model trained on `like` reads it: the same image shape,
    and its class names matched to `like`'s (case-insensitively)."""
    h, _, c = like.image_shape
    return load_dataset(spec, image_size=h, channels=c, classes=like.class_names or None).test


def load_dataset(spec: str, image_size: int | None = None, channels: int | None = None,
                 classes: Sequence[str] | None = None, patient_pattern: str | None = None) -> Dataset:
    """Load a dataset named by a builtin name, an .npz path or a folder path.

    Args:
        spec: "builtin:pneumoniamnist" (or bare "pneumoniamnist"), a MedMNIST-style .npz file,
            or a folder of class subfolders (see `load_image_folder`). A bare builtin name wins
            over a folder of that name in the working directory; write "./name" for the folder.
        image_size: resize images to image_size x image_size; None keeps an .npz's size and
            gives 28 for a folder.
        channels: 1 (grayscale) or 3 (RGB); None keeps an .npz's channels and gives 1 for a
            folder.
        classes: the class names in label order (a topology's data.classes), matched
            case-insensitively to class folders or CSV labels; for an .npz they name its
            label ids. None: the sorted folder names, or an .npz's own.
        patient_pattern: for a folder, see `load_image_folder` (an .npz has no file names).

    Returns:
        The loaded Dataset.

    Raises:
        DataError: unknown builtin name, missing path, or unusable file contents.
    """
    name = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or name in BUILTIN:
        if name not in BUILTIN:
            raise DataError(f"{spec}: unknown builtin dataset; known: {', '.join(sorted(BUILTIN))}")
        own = BUILTIN_CLASSES[name]
        if classes and [c.strip().casefold() for c in classes] != list(own):
            raise DataError(f"{spec}: its classes are {list(own)}, not {list(classes)}")
        return dataclasses.replace(load_npz(BUILTIN[name], image_size=image_size, channels=channels),
                                   class_names=tuple(c.strip() for c in classes) if classes else own)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_image_folder(path, image_size=image_size or 28, channels=channels or 1, classes=classes,
                                 patient_pattern=patient_pattern)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; give a folder of class subfolders, an .npz file "
            f"or builtin:{next(iter(BUILTIN))}"
        )
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: not an .npz file or a folder; give a folder of class subfolders or an .npz")
    return load_npz(path, image_size=image_size, channels=channels, classes=classes)


def load_npz(path: str | os.PathLike, image_size: int | None = None,
             channels: int | None = None, classes: Sequence[str] | None = None) -> Dataset:
    """Load a MedMNIST-style .npz archive.

    Keys: train_images, train_labels, val_images, val_labels, test_images, test_labels; images
    uint8 (N, H, W) or (N, H, W, C) with C in {1, 3}, or float in [0, 1]; labels integer (N,)
    or (N, 1). Optional scalars `num_classes` and `name` and the array `class_names` (written
    by `save_npz`). Without them,
    num_classes is the largest label + 1 (at least 2) and name is the file stem. An archive
    with neither val key gets a validation split carved from train: a stratified 10%, seed 0.

    Args:
        path: the .npz file.
        image_size: resize to image_size x image_size (bilinear) if given and different.
        channels: convert to 1 (luminance) or 3 (gray repeated) channels if given and different.
        classes: names for the label ids (label i is classes[i]); the archive's own
            `class_names`, if any, must match them case-insensitively.

    Returns:
        The loaded Dataset.

    Raises:
        DataError: the file is unreadable, lacks a key, holds arrays of the wrong shape,
            dtype or value range, or labels or class names that `classes` cannot name.
    """
    path = Path(path)
    _check_target(image_size, channels)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the path of a MedMNIST-style .npz")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz (zip) archive; save it with numpy.savez")
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        # No val keys at all: carve val below. One without the other: _read_key reports it.
        has_val = not keys.isdisjoint({"val_images", "val_labels"})
        splits = {
            split: _read_split_arrays(archive, path, split)
            for split in SPLITS if split != "val" or has_val
        }
        stored_classes = _read_scalar(archive, path, "num_classes") if "num_classes" in keys else None
        name = str(_read_scalar(archive, path, "name")) if "name" in keys else path.stem
        stored_names = tuple(str(n) for n in _read_key(archive, path, "class_names")) if "class_names" in keys else ()
    _check_same_image_shape(splits, path)
    if "val" not in splits:
        rng = np.random.default_rng(NPZ_VAL_SEED)
        images, labels = splits["train"]
        keep, held = _stratified_split(labels, [NPZ_VAL_FRACTION], rng)
        splits["train"], splits["val"] = (images[keep], labels[keep]), (images[held], labels[held])
    num_classes = _num_classes(path, [labels for _, labels in splits.values()], stored_classes)
    class_names = stored_names
    if classes:
        if stored_names and [n.casefold() for n in stored_names] != [c.strip().casefold() for c in classes]:
            raise DataError(f"{path}: its classes {list(stored_names)} are not the topology's data.classes "
                            f"{list(classes)} in that order")
        if num_classes > len(classes):
            raise DataError(f"{path}: labels of {num_classes} classes, but data.classes names {len(classes)}")
        num_classes, class_names = len(classes), tuple(c.strip() for c in classes)
    adapted = {
        split: Split(_adapt(images, image_size, channels), labels)
        for split, (images, labels) in splits.items()
    }
    return Dataset(adapted["train"], adapted["val"], adapted["test"], num_classes, name, class_names=class_names)


def save_npz(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write a dataset as a MedMNIST-style .npz, atomically.

    Images are stored as uint8 round(x * 255), the channel axis dropped when C == 1; labels as
    (N, 1) uint8 (int32 beyond 256 classes); plus `num_classes` and `name` scalars. Loading the
    file with `load_npz` gives back the same dataset exactly when its pixels are multiples of
    1/255 (true of anything loaded from uint8 data without resizing).

    Args:
        dataset: the dataset to write.
        path: destination file; missing parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    label_dtype = np.uint8 if dataset.num_classes <= 256 else np.int32
    arrays = {"num_classes": np.array(dataset.num_classes), "name": np.array(dataset.name)}
    if dataset.class_names:
        arrays["class_names"] = np.array(dataset.class_names)
    for split_name in SPLITS:
        split = getattr(dataset, split_name)
        images = np.rint(np.clip(split.images, 0, 1) * 255).astype(np.uint8)
        arrays[f"{split_name}_images"] = images[..., 0] if images.shape[-1] == 1 else images
        arrays[f"{split_name}_labels"] = split.labels.astype(label_dtype)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target, then rename: readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez_compressed(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_image_folder(path: str | os.PathLike, image_size: int = 28, channels: int = 1,
                      seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                      labels_csv: str | os.PathLike | None = None,
                      classes: Sequence[str] | None = None, patient_pattern: str | None = None) -> Dataset:
    """Load a folder of PNG/JPEG/DICOM images with one subfolder per class, or labelled by a CSV.

    Layouts: `path/<class>/<image>`, or `path/{train,val,test}/<class>/<image>` (the Kaggle
    chest X-ray layout; other folders beside the split folders are ignored). A missing val/ or
    test/ is carved from train/, and a folder without split folders is split three ways; both
    by a stratified seeded split with the given fractions of the carved-from images. Labels are
    the sorted class folder names' positions (NORMAL -> 0, PNEUMONIA -> 1), or with `classes`
    the positions in that list, folder names matched case-insensitively (a site may then lack
    a class; a folder the list does not name is an error). Files whose names
    start with "." or "__" (.DS_Store, __MACOSX) are ignored, and so are files that are neither
    .png/.jpg/.jpeg nor DICOM. Images of any mode are converted to `channels` (RGB to gray by
    luminance, alpha dropped) and resized bilinearly; 8-bit images are divided by 255 and
    16-bit ones by 65535, so intensities keep their meaning across images (no per-image
    contrast stretch).

    DICOM files are recognised by the DICM signature at bytes 128..131, whatever their name
    (no extension, .dcm, ...), and may sit beside PNG/JPEG files. Each is rescaled
    (RescaleSlope/Intercept), windowed to its first stored WindowCenter/WindowWidth (else to
    its min-max), scaled to [0, 1], MONOCHROME1 inverted, first frame only for multi-frame
    files (see `p2p_fl.data.dicom`). A PNG/JPEG that does not decode, or a DICOM that is
    corrupt, has no pixel data or uses a compression pydicom cannot decode here, is skipped:
    one warning per file, one summary warning, and listed in the returned Dataset's
    `skipped` (a hospital's folder of thousands of files should not stop on one bad file).
    A class whose files are all skipped is an error.

    With `labels_csv`, the class folders are not used: the CSV's rows are `file,label` (an
    optional header row whose first cell is file/path/filename/image), relative file paths
    are resolved against `path`, the classes are the distinct labels sorted (numerically when
    all are integers), and the listed files are split three ways as above.

    Args:
        path: the folder.
        image_size: output images are image_size x image_size.
        channels: 1 (grayscale) or 3 (RGB).
        seed: seed of the carved splits.
        val_fraction: fraction held out for validation when there is no val/ folder.
        test_fraction: fraction held out for testing when there is no test/ folder.
        labels_csv: optional CSV of (file, label) rows that replaces the class folders.
        classes: the class names in label order (a topology's data.classes), or None.
        patient_pattern: a regular expression whose first group, searched in a file's name,
            is its patient (e.g. `^(person\\d+)_` for the Kaggle chest X-rays): the carved
            splits then keep each patient's images together (grouped by patient, stratified
            by each patient's majority class), so no patient is in both train and test.

    Returns:
        The loaded Dataset, named after the folder, with the skipped files in `skipped`.

    Raises:
        DataError: no class subfolders (or only one), an empty class folder, class folders that
            differ between splits, a folder or label `classes` does not name, a class whose
            files are all skipped, or a CSV row naming a missing file or giving no label.
    """
    folder = Path(path)
    _check_target(image_size, channels)
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need fractions >= 0 with val + test < 1, got {val_fraction}, {test_fraction}")
    if labels_csv is None:
        class_names, groups = _folder_groups(folder, classes)
    else:
        class_names, train_groups = _csv_groups(folder, Path(labels_csv), classes)
        groups = {"train": train_groups}
    splits, skipped, files = {}, [], {}
    for split, split_groups in groups.items():
        images, labels, files[split], split_skipped = _read_image_split(split_groups, image_size, channels)
        splits[split] = images, labels
        skipped += split_skipped
    if skipped:
        log.warning("%s: skipped %d unreadable file(s)", folder, len(skipped))
    missing = [split for split in ("val", "test") if split not in splits]
    if missing:
        images, labels = splits["train"]
        fractions = {"val": val_fraction, "test": test_fraction}
        rng = np.random.default_rng(seed)
        if patient_pattern:
            patients = _patients(files["train"], patient_pattern)
            keep, *held = _grouped_split(labels, patients, [fractions[split] for split in missing], rng)
            log.info("%s: %s carved by patient (%d patients in train/)", folder, " and ".join(missing),
                     len(set(patients)))
        else:
            keep, *held = _stratified_split(labels, [fractions[split] for split in missing], rng)
        splits["train"] = images[keep], labels[keep]
        for split, index in zip(missing, held):
            splits[split] = images[index], labels[index]
    built = {split: Split(*arrays) for split, arrays in splits.items()}
    return Dataset(built["train"], built["val"], built["test"], len(class_names),
                   folder.resolve().name, skipped=tuple(skipped), class_names=tuple(class_names))


def _check_target(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- .npz ------------------------------------------------------------------------------------


def _read_key(archive, path: Path, key: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(
            f"{path}: missing key '{key}'; a MedMNIST .npz needs "
            f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)}"
        )
    try:
        return archive[key]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read key '{key}' ({_one_line(exc)}); rewrite the file") from exc


def _read_scalar(archive, path: Path, key: str):
    value = _read_key(archive, path, key)
    if value.ndim != 0:
        raise DataError(f"{path}: key '{key}' should be a scalar, got shape {value.shape}")
    return value.item()


def _read_split_arrays(archive, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images = _as_float_images(_read_key(archive, path, f"{split}_images"), path, f"{split}_images")
    labels = _as_labels(_read_key(archive, path, f"{split}_labels"), path, f"{split}_labels")
    if len(images) != len(labels):
        raise DataError(
            f"{path}: {split}_images has {len(images)} images but {split}_labels has "
            f"{len(labels)} labels; they must match one to one"
        )
    return images, labels


def _as_float_images(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: key '{key}' has shape {images.shape}; expected (N, H, W) or (N, H, W, 1 or 3)"
        )
    if images.dtype == np.uint8:
        return np.divide(images, 255, dtype=np.float32)
    if images.dtype.kind != "f":
        raise DataError(f"{path}: key '{key}' has dtype {images.dtype}; store uint8 or floats in [0, 1]")
    # `not (lo >= 0 and hi <= 1)` also catches NaN.
    if images.size and not (images.min() >= 0 and images.max() <= 1):
        raise DataError(f"{path}: key '{key}' has float values outside [0, 1] (or NaN); rescale them")
    return images.astype(np.float32, copy=False)


def _as_labels(labels: np.ndarray, path: Path, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: key '{key}' has shape {labels.shape}; expected (N,) or (N, 1) "
            "single-label class ids (multi-label data is not supported)"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: key '{key}' has dtype {labels.dtype}; store integer class ids")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise DataError(f"{path}: key '{key}' has labels outside [0, 2**31); use class ids 0, 1, ...")
    return labels.astype(np.int32)


def _check_same_image_shape(splits: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    shapes = {split: images.shape[1:] for split, (images, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{split}_images {shape}" for split, shape in shapes.items())
        raise DataError(f"{path}: splits hold images of different shapes ({described}); make them equal")


def _num_classes(path: Path, label_sets: list[np.ndarray], stored: int | None) -> int:
    needed = max((int(labels.max()) + 1 for labels in label_sets if labels.size), default=0)
    if stored is None:
        return max(needed, 2)
    if not isinstance(stored, int) or stored < max(needed, 2):
        raise DataError(
            f"{path}: key 'num_classes' is {stored!r} but labels need at least {max(needed, 2)}; "
            "fix or remove the key"
        )
    return stored


# --- image folders ---------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith((".", "__"))


def _split_dirs(folder: Path) -> dict[str, Path]:
    """Map split name -> folder; a folder without split subfolders is all "train"."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give a folder with one subfolder per class")
    found = {
        child.name.lower(): child for child in sorted(folder.iterdir())
        if child.is_dir() and child.name.lower() in SPLITS
    }
    if not found:
        return {"train": folder}
    if "train" not in found:
        raise DataError(
            f"{folder}: has {'/, '.join(sorted(found))}/ but no train/; add train/ or put the "
            "class folders directly in it"
        )
    return found


def _class_names(folder: Path) -> list[str]:
    names = sorted(child.name for child in folder.iterdir() if child.is_dir() and not _is_hidden(child))
    if len(names) < 2:
        raise DataError(
            f"{folder}: found {len(names)} class subfolder(s) {names}; put the images in one "
            "subfolder per class (e.g. NORMAL/, PNEUMONIA/), every class present at every site"
        )
    return names


# One class's files in one split: (where they come from, for errors; the files).
ClassFiles = tuple[str, list[Path]]


def _folder_groups(folder: Path, classes: Sequence[str] | None) -> tuple[list[str], dict[str, list[ClassFiles]]]:
    """Class names and, per split, each class folder's image files (in class order)."""
    split_dirs = _split_dirs(folder)
    if classes:
        return _named_class_groups(split_dirs, classes)
    class_names = _class_names(split_dirs["train"])
    for split_dir in split_dirs.values():
        found = _class_names(split_dir)
        if found != class_names:
            raise DataError(
                f"{split_dir}: class folders {found} differ from {split_dirs['train']}'s "
                f"{class_names}; give every split the same class folders"
            )
    groups = {
        split: [(str(split_dir / name), _image_files(split_dir / name)) for name in class_names]
        for split, split_dir in split_dirs.items()
    }
    return class_names, groups


def _named_class_groups(split_dirs: dict[str, Path],
                        classes: Sequence[str]) -> tuple[list[str], dict[str, list[ClassFiles]]]:
    """Groups for the topology's class list: each folder matched to its class
    case-insensitively; a class this site lacks gets no files."""
    index = {c.strip().casefold(): i for i, c in enumerate(classes)}
    groups = {}
    for split, split_dir in split_dirs.items():
        folders = [child for child in sorted(split_dir.iterdir()) if child.is_dir() and not _is_hidden(child)]
        unknown = [child.name for child in folders if child.name.strip().casefold() not in index]
        if unknown:
            raise DataError(f"{split_dir}: class folder(s) {unknown} are not among the topology's data.classes "
                            f"{list(classes)}; rename or remove them")
        if not folders:
            raise DataError(f"{split_dir}: no class subfolders; put the images in one subfolder per class "
                            f"({', '.join(classes)})")
        split_groups: list[ClassFiles] = [(f"{split_dir} (no {c}/)", []) for c in classes]
        for child in folders:
            i = index[child.name.strip().casefold()]
            if split_groups[i][1]:
                raise DataError(f"{split_dir}: two folders for class {classes[i]!r} (names match case-insensitively)")
            split_groups[i] = (str(child), _image_files(child))
        groups[split] = split_groups
    return [c.strip() for c in classes], groups


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        child for child in class_dir.iterdir()
        if child.is_file() and not _is_hidden(child) and _is_image_file(child)
    )
    if not files:
        raise DataError(
            f"{class_dir}: no .png/.jpg/.jpeg or DICOM images in this class folder; add some or remove it"
        )
    return files


_CSV_HEADER_NAMES = frozenset({"file", "path", "filename", "image"})


def _csv_groups(folder: Path, csv_path: Path,
                classes: Sequence[str] | None = None) -> tuple[list[str], list[ClassFiles]]:
    """Class names and each class's files, from a CSV of (file, label) rows."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; give the folder the CSV's file paths are relative to")
    by_label: dict[str, list[Path]] = {}
    for line, file, label in _csv_rows(csv_path):
        image = folder / file  # an absolute path in the CSV stays as it is
        if not image.is_file():
            raise DataError(
                f"{csv_path}: line {line}: file {image} not found; fix the path (relative to {folder})"
            )
        if not _is_image_file(image):
            raise DataError(f"{csv_path}: line {line}: {image} is not a .png/.jpg/.jpeg or DICOM file")
        by_label.setdefault(label, []).append(image)
    if classes:
        index = {c.strip().casefold(): c.strip() for c in classes}
        unknown = sorted(label for label in by_label if label.casefold() not in index)
        if unknown:
            raise DataError(f"{csv_path}: label(s) {unknown} are not among the topology's data.classes {list(classes)}")
        named: dict[str, list[Path]] = {}
        for label, files in by_label.items():
            named.setdefault(index[label.casefold()], []).extend(files)
        return list(index.values()), [(f"{csv_path} label '{name}'", named.get(name, [])) for name in index.values()]
    class_names = _sorted_labels(by_label)
    if len(class_names) < 2:
        raise DataError(
            f"{csv_path}: found {len(class_names)} distinct label(s) {class_names}; need at least 2 classes"
        )
    return class_names, [(f"{csv_path} label '{name}'", by_label[name]) for name in class_names]


def _csv_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """(line number, file, label) of each non-blank row, the header row left out."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            rows = [(line, [cell.strip() for cell in row]) for line, row in enumerate(csv.reader(file), 1)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the labels CSV ({_one_line(exc)})") from exc
    rows = [(line, cells) for line, cells in rows if any(cells)]
    if rows and rows[0][1][0].lower() in _CSV_HEADER_NAMES:
        rows = rows[1:]
    parsed = []
    for line, cells in rows:
        if len(cells) != 2 or not cells[0]:
            raise DataError(f"{csv_path}: line {line}: expected 'file,label', got {','.join(cells)!r}")
        if not cells[1]:
            raise DataError(
                f"{csv_path}: line {line}: unknown (empty) label for {cells[0]}; give every file a label"
            )
        parsed.append((line, cells[0], cells[1]))
    if not parsed:
        raise DataError(f"{csv_path}: no 'file,label' rows; list one image per row")
    return parsed


def _sorted_labels(labels) -> list[str]:
    """Sorted label names; numerically when all are integers, so "10" comes after "9"."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_image_split(groups: list[ClassFiles], image_size: int,
                      channels: int) -> tuple[np.ndarray, np.ndarray, list[Path], list[Path]]:
    """Images, labels (position in `groups`), the files read (in image order) and the
    skipped files of one split."""
    files = [file for _, class_files in groups for file in class_files]
    labels = np.repeat(np.arange(len(groups), dtype=np.int32), [len(f) for _, f in groups])
    images, read_files, skipped = read_images(files, image_size, channels)
    unread = set(skipped)
    read = np.array([file not in unread for file in files], dtype=bool)
    for label, (where, class_files) in enumerate(groups):
        if class_files and not read[labels == label].any():
            raise DataError(
                f"{where}: all {len(class_files)} file(s) were skipped as unreadable "
                "(see the warnings); replace them or remove the class"
            )
    if not read.any():
        raise DataError(f"{groups[0][0]}: no readable image in this split (see the warnings)")
    return images, labels[read], read_files, skipped


def _patients(files: list[Path], pattern: str) -> list[str]:
    """Each file's patient: the first group of `pattern` searched in its name."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise DataError(f"data.patient_pattern {pattern!r} is not a regular expression ({exc})") from None
    if regex.groups < 1:
        raise DataError(f"data.patient_pattern {pattern!r} needs a group, e.g. ^(person\\d+)_, for the patient")
    patients = []
    for file in files:
        match = regex.search(file.name)
        if match is None or not match.group(1):
            raise DataError(f"{file}: data.patient_pattern {pattern!r} finds no patient in this name; fix the "
                            "pattern or the name")
        patients.append(match.group(1))
    return patients


def read_images(paths: Sequence[Path], image_size: int, channels: int) -> tuple[np.ndarray, list[Path], list[Path]]:
    """Decodes image files (PNG/JPEG/DICOM) as a folder's are read: (images (N, H, W, C), the
    files read, the files skipped as unreadable, each logged)."""
    # Pillow releases the GIL while decoding, so threads speed up large folders.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda file: _read_file(file, image_size, channels), paths))
    read = [p for p, image in zip(paths, images) if image is not None]
    skipped = [p for p, image in zip(paths, images) if image is None]
    stacked = np.stack([image for image in images if image is not None]) if read else \
        np.zeros((0, image_size, image_size, channels), np.float32)
    return stacked, read, skipped


def image_files_under(path: Path) -> list[Path]:
    """Every image file (PNG/JPEG by suffix, DICOM by signature) in a folder and its
    subfolders, sorted, hidden files left out; a file path is itself."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith((".", "__")) for part in
                  p.relative_to(path).parts) and _is_image_file(p))


def _read_file(path: Path, image_size: int, channels: int) -> np.ndarray | None:
    """Decode a PNG/JPEG or DICOM file; None (logged) for a file that must be skipped."""
    if not is_dicom(path):
        try:
            return _read_image(path, image_size, channels)
        except DataError as exc:
            log.warning("%s: skipped, %s", path, str(exc).removeprefix(f"{path}: "))
            return None
    try:
        pixels = read_dicom(path)
    except UnreadableDicom as exc:
        log.warning("%s: skipped, %s", path, exc)
        return None
    batch = pixels[None, ..., None] if pixels.ndim == 2 else pixels[None]
    return _adapt(batch, image_size, channels)[0]


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one image file to a float32 (image_size, image_size, channels) array in [0, 1]."""
    size = (image_size, image_size)
    try:
        with Image.open(path) as image:
            # JPEG only: decode at a reduced scale still >= size, much faster for large X-rays.
            image.draft("L" if channels == 1 else "RGB", size)
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES:
                # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
                gray = np.clip(np.asarray(image, dtype=np.float32), 0, 65535) / 65535
                plane = np.asarray(Image.fromarray(gray).resize(size, _BILINEAR))
                return np.repeat(np.clip(plane, 0, 1)[..., None], channels, axis=-1)
            converted = image.convert("L" if channels == 1 else "RGB").resize(size, _BILINEAR)
            pixels = np.divide(np.asarray(converted), 255, dtype=np.float32)
            return pixels.reshape(image_size, image_size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({_one_line(exc)})") from exc


# --- shared array helpers --------------------------------------------------------------------


def _grouped_split(labels: np.ndarray, groups: list[str], fractions: list[float],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """As `_stratified_split`, but each group (a patient) lies wholly in one part: the groups
    of each majority class, in random order, fill the held-out parts up to their fraction of
    that class's images; the rest stay."""
    names, group_of = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(group_of, minlength=len(names))
    majority = np.array([np.bincount(labels[group_of == g]).argmax() for g in range(len(names))])
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(majority):
        members = rng.permutation(np.flatnonzero(majority == label))
        total = int(sizes[members].sum())
        targets = [int(total * f + 0.5) for f in fractions]
        filled = [0] * len(fractions)
        for g in members:
            k = next((i for i, (have, want) in enumerate(zip(filled, targets)) if have < want), None)
            if k is None:
                parts[0].append(g)
            else:
                parts[k + 1].append(g)
                filled[k] += int(sizes[g])
    return [np.flatnonzero(np.isin(group_of, part)) for part in parts]


def _stratified_split(labels: np.ndarray, fractions: list[float],
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices per class: the rest first, then one sorted index array per fraction."""
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.minimum(np.cumsum([int(len(members) * f + 0.5) for f in fractions]), len(members))
        *held, rest = np.split(members, cuts)
        for part, chunk in zip(parts, [rest, *held]):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) if part else np.zeros(0, np.int64) for part in parts]


def _adapt(images: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """Convert (N, H, W, C) float images to the requested size and channels."""
    # Go to gray before resizing and to RGB after: fewer planes to resize.
    if channels == 1:
        images = _to_channels(images, 1)
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        images = _resize(images, image_size)
    return images if channels is None else _to_channels(images, channels)


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[-1] == channels:
        return images
    if channels == 1:
        return np.clip(images @ _LUMA, 0, 1)[..., None]
    return np.concatenate([images] * 3, axis=-1)  # several times faster than np.repeat here


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(images), size, size, images.shape[-1]), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(image.shape[-1]):
            plane = Image.fromarray(np.ascontiguousarray(image[..., c]))
            out[i, ..., c] = np.asarray(plane.resize((size, size), _BILINEAR))
    # Bilinear weights are convex, but float rounding can step just outside [0, 1].
    return np.clip(out, 0, 1, out=out)
