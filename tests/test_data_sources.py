"""Loading data: the builtin PneumoniaMNIST, MedMNIST .npz files and folders of images."""

import numpy as np
import pytest
from PIL import Image

from p2p_fl.data import DataError, Dataset, Split, load_dataset, load_image_folder, load_npz, save_npz

NO_SPLIT = {"val_fraction": 0.0, "test_fraction": 0.0}
LUMA_RED = 0.299  # gray value of pure red (ITU-R 601-2, as Pillow)


def write_image(path, mode, value, size=(12, 9)):
    """Write a constant image: `value` is a pixel value in the mode's own range."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    else:
        image = Image.new(mode, size, value)
    image.save(path)


def write_class_folders(root, counts, size=(12, 9)):
    """Write `counts[name]` gray PNGs into root/<name>/, each class a different intensity."""
    for label, (name, count) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / name / f"img{i:02d}.png", "L", 40 + 100 * label, size)


def make_npz(path, **overrides):
    """Write a tiny valid MedMNIST-style npz (RGB, 3 classes), with keys replaced or removed."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).astype(np.int64)
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def test_builtin_has_official_splits_as_floats_in_unit_range():
    data = load_dataset("builtin:pneumoniamnist")
    assert (len(data.train), len(data.val), len(data.test)) == (4707, 524, 624)
    assert data.image_shape == (28, 28, 1)
    assert data.num_classes == 2 and data.name == "pneumoniamnist"
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert 0 <= split.images.min() and split.images.max() <= 1
    # Class counts of the data README: normal / pneumonia per split.
    assert np.bincount(data.train.labels).tolist() == [1213, 3494]
    assert np.bincount(data.test.labels).tolist() == [234, 390]
    bare = load_dataset("pneumoniamnist")
    np.testing.assert_array_equal(bare.val.images, data.val.images)


def test_save_npz_round_trip_is_exact_and_keeps_num_classes(tmp_path):
    rng = np.random.default_rng(1)

    def split(n):  # pixels on the 8-bit grid, as any uint8 source gives
        return Split(rng.integers(0, 256, (n, 5, 5, 1)).astype(np.float32) / 255,
                     rng.integers(0, 2, n).astype(np.int32))

    # A shard whose labels are only 0/1 but whose federation has 5 classes.
    shard = Dataset(split(7), split(3), split(0), num_classes=5, name="site-a")
    path = save_npz(shard, tmp_path / "shards" / "a.npz")
    loaded = load_npz(path)
    assert loaded.num_classes == 5 and loaded.name == "site-a"
    for name in ("train", "val", "test"):
        original, back = getattr(shard, name), getattr(loaded, name)
        np.testing.assert_array_equal(back.images, original.images)
        np.testing.assert_array_equal(back.labels, original.labels)
    assert [p.name for p in path.parent.iterdir()] == ["a.npz"]  # no temporary file left behind


def test_rgb_npz_converts_to_gray_by_luminance_and_resizes(tmp_path):
    red = np.zeros((3, 6, 6, 3), np.uint8)
    red[..., 0] = 255
    labels = np.array([[0], [1], [1]], np.uint8)  # MedMNIST's (N, 1) uint8 labels
    path = make_npz(tmp_path / "rgb.npz", train_images=red, train_labels=labels,
                    val_images=red, val_labels=labels)
    data = load_npz(path, image_size=4, channels=1)
    assert data.image_shape == (4, 4, 1) and data.num_classes == 3
    np.testing.assert_allclose(data.train.images, LUMA_RED, atol=1e-6)
    assert data.train.labels.tolist() == [0, 1, 1]


def test_gray_float_npz_expands_to_rgb(tmp_path):
    gray = np.linspace(0, 1, 4 * 5 * 5, dtype=np.float64).reshape(4, 5, 5)
    labels = np.array([0, 1, 0, 1])
    path = make_npz(tmp_path / "gray.npz", train_images=gray, train_labels=labels,
                    val_images=gray, val_labels=labels, test_images=gray, test_labels=labels)
    data = load_npz(path, channels=3)
    assert data.image_shape == (5, 5, 3) and data.train.images.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(data.train.images[..., c], gray, atol=1e-7)


def test_npz_without_val_carves_a_stratified_tenth_of_train(tmp_path):
    images = np.zeros((100, 6, 6, 3), np.uint8)
    labels = np.repeat([0, 1], 50)
    path = make_npz(tmp_path / "noval.npz", train_images=images, train_labels=labels,
                    val_images=None, val_labels=None)
    data = load_npz(path)
    assert (len(data.train), len(data.val)) == (90, 10)
    assert np.bincount(data.val.labels).tolist() == [5, 5]
    np.testing.assert_array_equal(load_npz(path).val.labels, data.val.labels)  # seeded


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"test_labels": None}, "test_labels"),
        ({"val_labels": None}, "val_labels"),  # one val key without the other
        ({"train_labels": np.zeros(11, np.int64)}, "train_labels"),  # 12 images, 11 labels
        ({"train_images": np.zeros((12, 6), np.uint8)}, "train_images"),  # wrong ndim
        ({"test_images": np.full((5, 6, 6, 3), 2.0)}, "test_images"),  # floats beyond 1
        ({"val_labels": np.zeros((4, 3), np.int64)}, "val_labels"),  # multi-label
    ],
)
def test_bad_npz_error_names_file_and_key(tmp_path, overrides, expected):
    path = make_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError) as error:
        load_npz(path)
    message = str(error.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_non_npz_file_and_missing_path_are_data_errors(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match="junk.npz"):
        load_dataset(str(junk))
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown builtin"):
        load_dataset("builtin:chestmnist")


def test_folder_without_split_folders_is_split_by_class(tmp_path):
    write_class_folders(tmp_path / "xrays", {"PNEUMONIA": 20, "NORMAL": 10})
    data = load_dataset(str(tmp_path / "xrays"), image_size=8)
    assert data.name == "xrays" and data.num_classes == 2 and data.image_shape == (8, 8, 1)
    # Stratified 10% val and 20% test of each class; NORMAL sorts first, so it is label 0.
    assert np.bincount(data.train.labels).tolist() == [7, 14]
    assert np.bincount(data.val.labels).tolist() == [1, 2]
    assert np.bincount(data.test.labels).tolist() == [2, 4]
    np.testing.assert_allclose(data.test.images[data.test.labels == 0], 40 / 255, atol=1e-6)
    np.testing.assert_allclose(data.test.images[data.test.labels == 1], 140 / 255, atol=1e-6)
    again = load_image_folder(tmp_path / "xrays", image_size=8)
    np.testing.assert_array_equal(again.test.images, data.test.images)


def test_folder_reads_modes_sizes_and_bit_depths(tmp_path):
    root = tmp_path / "site"
    cls = root / "train" / "A"
    write_image(cls / "a_16bit_full.png", "I;16", 65535)
    write_image(cls / "b_16bit_fifth.png", "I;16", 13107)  # 0.2 of the 16-bit range
    write_image(cls / "c_rgba_red.png", "RGBA", (255, 0, 0, 128))
    write_image(cls / "d_rgb.JPEG", "RGB", (255, 255, 255), size=(40, 30))
    write_image(cls / "e_palette.PNG", "P", 200, size=(3, 50))
    write_image(cls / "f_gray_large.png", "L", 51, size=(64, 48))
    (cls / ".DS_Store").write_bytes(b"\0\1")
    (cls / "notes.txt").write_text("not an image")
    write_image(root / "train" / "B" / "x.png", "L", 0)
    for split in ("val", "test"):
        write_class_folders(root / split, {"A": 1, "B": 1})
    data = load_image_folder(root, image_size=6, channels=1)
    palette_gray = np.asarray(Image.open(cls / "e_palette.PNG").convert("L"))[0, 0] / 255
    expected = [1.0, 0.2, LUMA_RED, 1.0, palette_gray, 0.2, 0.0]
    np.testing.assert_allclose(data.train.images.mean(axis=(1, 2, 3)), expected, atol=0.01)
    assert data.train.labels.tolist() == [0] * 6 + [1]
    assert (len(data.val), len(data.test)) == (2, 2)
    rgb = load_image_folder(root, image_size=6, channels=3)
    assert rgb.image_shape == (6, 6, 3)
    np.testing.assert_allclose(rgb.train.images[2, 0, 0], [1, 0, 0], atol=0.01)


def test_folder_with_train_and_test_only_carves_val_from_train(tmp_path):
    write_class_folders(tmp_path / "kaggle" / "train", {"NORMAL": 10, "PNEUMONIA": 10})
    write_class_folders(tmp_path / "kaggle" / "test", {"NORMAL": 3, "PNEUMONIA": 4})
    data = load_image_folder(tmp_path / "kaggle", image_size=4)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 7)
    assert np.bincount(data.val.labels).tolist() == [1, 1]


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    write_class_folders(tmp_path / "site", {"A": 4, "B": 4})
    corrupt = tmp_path / "site" / "B" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(300))  # a JPEG header, then noise
    data = load_image_folder(tmp_path / "site", **NO_SPLIT)
    assert data.skipped == (corrupt,)
    assert np.bincount(data.train.labels).tolist() == [4, 4]  # every readable image kept, labels in place
    assert any(str(corrupt) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_a_class_whose_every_image_is_corrupt_is_an_error_naming_it(tmp_path):
    write_class_folders(tmp_path / "site", {"A": 2})
    (tmp_path / "site" / "B").mkdir()
    (tmp_path / "site" / "B" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as error:
        load_image_folder(tmp_path / "site")
    assert str(error.value).startswith(f"{tmp_path / 'site' / 'B'}:") and "\n" not in str(error.value)


def test_the_topology_class_list_fixes_labels_whatever_the_folder_case(tmp_path):
    # Site 1 writes NORMAL/ PNEUMONIA/, site 2 normal/ Pneumonia/: sorted names would give
    # site 2 other labels (lower case sorts after upper case); the class list gives both the same.
    write_class_folders(tmp_path / "one", {"NORMAL": 3, "PNEUMONIA": 5})
    write_class_folders(tmp_path / "two", {"Pneumonia": 5, "normal": 3})
    assert load_image_folder(tmp_path / "two", **NO_SPLIT).class_names == ("Pneumonia", "normal")  # the trap
    classes = ["normal", "pneumonia"]
    for site in ("one", "two"):
        data = load_image_folder(tmp_path / site, classes=classes, **NO_SPLIT)
        assert data.class_names == ("normal", "pneumonia") and data.num_classes == 2
        assert np.bincount(data.train.labels).tolist() == [3, 5]


def test_with_a_class_list_a_site_may_lack_a_class_but_not_have_an_unknown_one(tmp_path):
    write_class_folders(tmp_path / "few", {"pneumonia": 4})
    data = load_image_folder(tmp_path / "few", classes=["NORMAL", "PNEUMONIA"], **NO_SPLIT)
    assert data.num_classes == 2 and set(data.train.labels.tolist()) == {1}
    write_class_folders(tmp_path / "odd", {"normal": 2, "covid": 2})
    with pytest.raises(DataError, match="covid"):
        load_image_folder(tmp_path / "odd", classes=["NORMAL", "PNEUMONIA"])


def test_class_names_travel_with_a_saved_shard_and_are_checked_against_the_list(tmp_path):
    write_class_folders(tmp_path / "site", {"NORMAL": 3, "PNEUMONIA": 3})
    data = load_image_folder(tmp_path / "site", classes=["normal", "pneumonia"], **NO_SPLIT)
    path = save_npz(data, tmp_path / "shard.npz")
    assert load_npz(path).class_names == ("normal", "pneumonia")
    assert load_dataset(str(path), classes=["Normal", "Pneumonia"]).class_names == ("Normal", "Pneumonia")
    with pytest.raises(DataError, match="not the topology's data.classes"):
        load_dataset(str(path), classes=["pneumonia", "normal"])
    with pytest.raises(DataError, match="classes"):
        load_dataset("builtin:pneumoniamnist", classes=["pneumonia", "normal"])


@pytest.mark.parametrize(
    "layout, culprit",
    [
        ({"A": 2, "B": 0}, "site/B"),  # a class folder without images
        ({"A": 2}, "site"),  # a single class: labels would silently be wrong elsewhere
        ({}, "site"),  # images but no class folders
    ],
)
def test_bad_folder_layout_error_names_the_folder(tmp_path, layout, culprit):
    write_class_folders(tmp_path / "site", layout)
    write_image(tmp_path / "site" / "stray.png", "L", 0)
    with pytest.raises(DataError) as error:
        load_image_folder(tmp_path / "site")
    assert str(error.value).startswith(f"{tmp_path / culprit}:")


def test_class_folders_differing_between_splits_is_an_error(tmp_path):
    write_class_folders(tmp_path / "site" / "train", {"NORMAL": 2, "PNEUMONIA": 2})
    write_class_folders(tmp_path / "site" / "test", {"NORMAL": 2, "COVID": 2})
    with pytest.raises(DataError, match="differ"):
        load_image_folder(tmp_path / "site")


def test_a_patient_pattern_keeps_each_patients_images_in_one_split(tmp_path):
    """Kaggle-style names (person12_bacteria_3.png): 40 patients of 1-6 images. By image,
    a patient's X-rays land in train and test alike (the model is tested on patients it
    trained on); by patient, never."""
    rng = np.random.default_rng(3)
    for p in range(40):
        label = "PNEUMONIA" if p % 3 else "NORMAL"
        for i in range(int(rng.integers(1, 7))):
            write_image(tmp_path / "site" / label / f"person{p}_virus_{i}.png", "L", 40 + p)

    def patients(data, split):
        return {int(round(float(image[0, 0, 0]) * 255)) - 40 for image in getattr(data, split).images}

    by_image = load_image_folder(tmp_path / "site", image_size=4)
    assert patients(by_image, "train") & (patients(by_image, "test") | patients(by_image, "val"))  # the leak
    data = load_image_folder(tmp_path / "site", image_size=4, patient_pattern=r"^(person\d+)_")
    train, val, test = (patients(data, s) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and val and test
    total = len(data.train) + len(data.val) + len(data.test)
    assert 0.1 < len(data.test) / total < 0.3 and set(data.test.labels.tolist()) == {0, 1}  # still stratified
    with pytest.raises(DataError, match="finds no patient"):
        load_image_folder(tmp_path / "site", image_size=4, patient_pattern=r"^(patient\d+)_")
