"""Read one DICOM file into a float image in [0, 1] (the folder walk lives in sources.py).

Per file: decode the pixel data (only what pydicom decodes with the packages installed;
other transfer syntaxes are reported as unreadable), keep the first frame of a multi-frame
file, apply RescaleSlope/RescaleIntercept, window to the first stored
WindowCenter/WindowWidth (or to the image's min-max when there is none), scale to [0, 1] and
invert MONOCHROME1 so that bright always means dense. Colour files (3 samples per pixel,
which pydicom gives as RGB) are divided by their largest storable value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pydicom is imported where a file is read: most sites never read DICOM
    import pydicom

# A DICOM Part 10 file: a 128-byte preamble, then the magic b"DICM".
_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
_GRAY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class UnreadableDicom(Exception):
    """A DICOM file to skip: corrupt, without pixel data, or in an undecodable format."""


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file carries the DICM signature at bytes 128..131, whatever its name."""
    try:
        with open(path, "rb") as file:
            head = file.read(_PREAMBLE_LENGTH + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE_LENGTH:] == _MAGIC


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """Decode one DICOM file to float32 (H, W) gray or (H, W, 3) RGB values in [0, 1].

    Raises:
        UnreadableDicom: the file is corrupt, has no pixel data, or cannot be decoded; the
            message is one line saying why.
    """
    dataset = _read_dataset(Path(path))
    pixels = _first_frame(_decode_pixels(dataset), dataset)
    interpretation = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if _samples_per_pixel(dataset) == 3:
        return _colour_to_unit(pixels, dataset)
    if interpretation not in _GRAY:
        raise UnreadableDicom(f"unsupported PhotometricInterpretation {interpretation}")
    values = _rescale(pixels, dataset)
    unit = _to_unit_range(values, *_window_bounds(values, dataset))
    # MONOCHROME1 stores dense tissue dark; flip it so every image has the same polarity.
    return 1 - unit if interpretation == "MONOCHROME1" else unit


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_dataset(path: Path) -> pydicom.Dataset:
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
    # pydicom reports garbage with many exception types (struct.error, KeyError, ...).
    except Exception as exc:  # noqa: BLE001
        raise UnreadableDicom(f"corrupt DICOM ({_one_line(exc)})") from exc
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        # Garbage after the signature parses to a few junk elements and no file meta.
        has_meta = "TransferSyntaxUID" in getattr(dataset, "file_meta", {})
        raise UnreadableDicom("no pixel data" if has_meta else "corrupt DICOM (no file meta, no pixel data)")
    return dataset


def _decode_pixels(dataset: pydicom.Dataset) -> np.ndarray:
    try:
        return dataset.pixel_array
    # Missing decoder plugins, truncated data and bad tags all surface here, in many types.
    except Exception as exc:  # noqa: BLE001
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        where = f" in transfer syntax {syntax.name}" if syntax is not None else ""
        raise UnreadableDicom(f"cannot decode pixel data{where} ({_one_line(exc)})") from exc


def _samples_per_pixel(dataset: pydicom.Dataset) -> int:
    return int(dataset.get("SamplesPerPixel", 1) or 1)


def _first_frame(pixels: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """Multi-frame files (cine, volumes) keep only their first frame."""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    return pixels[0] if frames > 1 else pixels


def _first_number(dataset: pydicom.Dataset, keyword: str) -> float | None:
    """The element's value as a float (the first one if multi-valued), or None if absent/empty."""
    from pydicom.multival import MultiValue

    value = dataset.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and np.isfinite(number) else None


def _rescale(pixels: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """Stored values to modality units (Hounsfield units for CT)."""
    slope = _first_number(dataset, "RescaleSlope")
    intercept = _first_number(dataset, "RescaleIntercept")
    return pixels.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)


def _window_bounds(values: np.ndarray, dataset: pydicom.Dataset) -> tuple[float, float]:
    """The stored window as [center - width/2, center + width/2], else the image's range."""
    center = _first_number(dataset, "WindowCenter")
    width = _first_number(dataset, "WindowWidth")
    if center is not None and width is not None and width > 0:
        return center - width / 2, center + width / 2
    return float(values.min()), float(values.max())


def _to_unit_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:  # a constant image has no contrast to keep
        return np.zeros(values.shape, np.float32)
    return np.clip((values - low) / (high - low), 0, 1).astype(np.float32)


def _colour_to_unit(pixels: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    bits = int(dataset.get("BitsStored", 8) or 8)
    return np.clip(pixels.astype(np.float32) / (2**bits - 1), 0, 1)
