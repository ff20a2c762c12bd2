"""DICOM in image folders, tested on real files that pydicom ships (never downloaded)."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from p2p_fl.data import DataError, load_image_folder
from p2p_fl.data.dicom import is_dicom

# pydicom's bundled test files; get_testdata_file would try to download missing ones.
BUNDLED = Path(pydicom.data.__file__).parent / "test_files"
NO_SPLIT = {"val_fraction": 0, "test_fraction": 0}  # keep every image in train


def bundled(name):
    matches = sorted(BUNDLED.rglob(name))
    assert matches, f"{name} is not bundled with pydicom {pydicom.__version__}"
    return matches[0]


def place(source, target):
    """Copy a bundled file to target (any name, any extension) and return the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundled(source) if isinstance(source, str) else source, target)
    return target


def expected_unit(name, invert=False):
    """The test's own transform of a file: rescale, window (or min-max), [0, 1], first frame."""
    ds = pydicom.dcmread(bundled(name))
    pixels = ds.pixel_array
    pixels = pixels[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels
    values = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = values.min(), values.max()
    unit = np.clip((values - low) / (high - low), 0, 1).astype(np.float32)
    return 1 - unit if invert else unit


def resized(unit, size):
    return np.asarray(Image.fromarray(unit).resize((size, size), Image.Resampling.BILINEAR))


def brightest_quadrant(image):
    half_h, half_w = image.shape[0] // 2, image.shape[1] // 2
    quadrants = [image[rows, cols] for rows in (slice(None, half_h), slice(half_h, None))
                 for cols in (slice(None, half_w), slice(half_w, None))]
    return int(np.argmax([quadrant.mean() for quadrant in quadrants]))


def test_ct_and_mr_load_with_and_without_extension_keeping_orientation(tmp_path):
    root = tmp_path / "scans"
    place("CT_small.dcm", root / "ct" / "a.dcm")
    place("CT_small.dcm", root / "ct" / "b")  # no extension: found by the DICM signature
    place("MR_small.dcm", root / "mr" / "c.DCM")
    place("MR_small.dcm", root / "mr" / "IM0001.img")
    data = load_image_folder(root, image_size=32, **NO_SPLIT)
    assert len(data.train) == 4 and data.train.labels.tolist() == [0, 0, 1, 1]
    assert data.skipped == () and data.image_shape == (32, 32, 1)
    images = data.train.images[..., 0]
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    for image, name in zip(images, ["CT_small.dcm"] * 2 + ["MR_small.dcm"] * 2):
        full = expected_unit(name)
        np.testing.assert_allclose(image, resized(full, 32), atol=1e-5)
        assert brightest_quadrant(image) == brightest_quadrant(full)
        assert not np.allclose(image, image.T, atol=0.05)  # a transpose would be caught
    # CT_small has no stored window: min-max keeps its full contrast.
    assert images[0].max() - images[0].min() > 0.5


def test_monochrome1_is_inverted(tmp_path):
    name = "6154"  # a real CR image stored as MONOCHROME1, with a window and a rescale
    assert pydicom.dcmread(bundled(name)).PhotometricInterpretation == "MONOCHROME1"
    place(name, tmp_path / "cr" / "a" / name)
    place("MR_small.dcm", tmp_path / "cr" / "b" / "mr")
    data = load_image_folder(tmp_path / "cr", image_size=16, **NO_SPLIT)  # its own size
    inverted = data.train.images[0, ..., 0]
    assert inverted.mean() == pytest.approx(1 - expected_unit(name).mean(), abs=1e-5)
    np.testing.assert_allclose(inverted, expected_unit(name, invert=True), atol=1e-5)


def test_multi_frame_keeps_the_first_frame_and_channels_expand(tmp_path):
    place("rtdose.dcm", tmp_path / "dose" / "a" / "dose")  # 15 frames of 10 x 10
    place("CT_small.dcm", tmp_path / "dose" / "b" / "ct")
    data = load_image_folder(tmp_path / "dose", image_size=10, channels=3, **NO_SPLIT)
    first = data.train.images[0]
    assert first.shape == (10, 10, 3)
    for c in range(3):
        np.testing.assert_allclose(first[..., c], expected_unit("rtdose.dcm"), atol=1e-5)


def write_corrupt(path):
    """A DICM signature followed by garbage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 4)
    return path


def write_without_pixels(path, source="CT_small.dcm"):
    """A real file with its PixelData element removed."""
    ds = pydicom.dcmread(bundled(source))
    del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_corrupt_and_pixelless_files_are_skipped_counted_and_logged(tmp_path, caplog):
    root = tmp_path / "mixed"
    place("CT_small.dcm", root / "a" / "good")
    corrupt = write_corrupt(root / "a" / "corrupt.dcm")
    empty = write_without_pixels(root / "b" / "nopixels")
    place("MR_small.dcm", root / "b" / "good.dcm")
    truncated = root / "a" / "truncated"
    truncated.write_bytes(bundled("CT_small.dcm").read_bytes()[:-5000])  # cut inside PixelData
    expected_skips = [corrupt, empty, truncated]
    # JPEG-LS needs a plugin (pylibjpeg or gdcm); without one the file is skipped too.
    jpeg_ls = place("MR_small_jpeg_ls_lossless.dcm", root / "b" / "jls.dcm")
    try:
        pydicom.dcmread(jpeg_ls).pixel_array
    except RuntimeError:
        expected_skips.append(jpeg_ls)
    with caplog.at_level(logging.WARNING, logger="p2p_fl.data.sources"):
        data = load_image_folder(root, image_size=8, **NO_SPLIT)
    assert sorted(data.skipped) == sorted(expected_skips)
    assert len(data.train) == 6 - len(expected_skips)
    warnings = [record.getMessage() for record in caplog.records]
    for path in expected_skips:
        assert sum(str(path) in message for message in warnings) == 1
    assert any(f"{empty}: skipped, no pixel data" in message for message in warnings)
    assert any(f"{corrupt}: skipped, corrupt" in message for message in warnings)
    assert any(f"skipped {len(expected_skips)} unreadable file" in message for message in warnings)


def test_class_with_only_skipped_files_is_an_error_naming_its_folder(tmp_path):
    place("CT_small.dcm", tmp_path / "f" / "a" / "ct")
    write_corrupt(tmp_path / "f" / "b" / "x")
    write_without_pixels(tmp_path / "f" / "b" / "y")
    with pytest.raises(DataError) as error:
        load_image_folder(tmp_path / "f", image_size=8, **NO_SPLIT)
    message = str(error.value)
    assert str(tmp_path / "f" / "b") in message and "\n" not in message


def test_png_and_dicom_mix_in_one_class_folder(tmp_path):
    root = tmp_path / "mix"
    place("CT_small.dcm", root / "a" / "ct")
    (root / "b").mkdir()
    Image.new("L", (5, 7), 200).save(root / "a" / "gray.png")
    Image.new("L", (5, 7), 50).save(root / "b" / "dark.png")
    place("MR_small.dcm", root / "b" / "mr.dcm")
    (root / "b" / "notes.txt").write_text("not an image")  # neither image nor DICOM: ignored
    data = load_image_folder(root, image_size=8, **NO_SPLIT)
    assert data.train.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(data.train.images[1], 200 / 255, atol=1e-6)  # a/gray.png
    np.testing.assert_allclose(data.train.images[2], 50 / 255, atol=1e-6)  # b/dark.png
    ct = resized(expected_unit("CT_small.dcm"), 8)
    np.testing.assert_allclose(data.train.images[0, ..., 0], ct, atol=1e-5)


def test_labels_from_csv_resolve_relative_paths(tmp_path):
    root = tmp_path / "flat"
    place("CT_small.dcm", root / "s1")
    place("MR_small.dcm", root / "sub" / "s2.dcm")
    place("6154", root / "s3")
    Image.new("L", (4, 4), 0).save(root / "s4.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,label\ns1,10\nsub/s2.dcm,9\n\ns3,10\ns4.png,9\n")
    data = load_image_folder(root, image_size=8, labels_csv=csv_path, **NO_SPLIT)
    # Integer labels sort numerically: "9" -> 0, "10" -> 1; files keep their CSV order per class.
    assert data.num_classes == 2 and data.train.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(data.train.images[1], 0, atol=1e-6)  # s4.png


@pytest.mark.parametrize(
    "rows, expected",
    [("s1,ct\nmissing.dcm,mr\n", "missing.dcm"), ("s1,ct\ns2,\n", "s2")],
)
def test_csv_missing_file_or_empty_label_is_a_one_line_error(tmp_path, rows, expected):
    place("CT_small.dcm", tmp_path / "d" / "s1")
    place("MR_small.dcm", tmp_path / "d" / "s2")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(rows)
    with pytest.raises(DataError) as error:
        load_image_folder(tmp_path / "d", labels_csv=csv_path)
    message = str(error.value)
    assert expected in message and str(csv_path) in message and "\n" not in message


def test_is_dicom_reads_the_signature_not_the_name(tmp_path):
    png = tmp_path / "x.dcm"
    Image.new("L", (4, 4)).save(png, format="PNG")
    assert not is_dicom(png)
    assert is_dicom(place("CT_small.dcm", tmp_path / "ct.png"))
    assert not is_dicom(tmp_path / "absent")
