"""Long-tailed construction: published counts, seeds, splits, manifests and the npz source."""

from __future__ import annotations

import numpy as np
import pytest

from cm.data import DataError, build_manifest, load_training_set
from cm.data.profiles import exponential_counts, many_medium_few, profile_counts, select_long_tailed
from tests.conftest import SHARED_CIFAR
from tests.helpers import CIFAR10_LT_100

OFFICIAL_LABELS = SHARED_CIFAR.parent.parent / "cifar_labels" / "official_order.npz"


def digits(ratio=10, seed=0, **more):
    return {"source": "digits", "path": None, "download": False, "profile": "exponential", "imbalance_ratio": ratio,
            "seed": seed, "hflip": False, "step_fraction": 0.5, "class_counts": None, **more}


@pytest.mark.parametrize("n_max, classes, ratio, counts, total", [
    (5000, 10, 100, CIFAR10_LT_100, 12406),
    (5000, 10, 50, None, 13996),
    (500, 100, 100, None, 10847),
    (500, 100, 50, None, 12608),
])
def test_exponential_profile_matches_published_totals(n_max, classes, ratio, counts, total):
    got = exponential_counts(n_max, classes, ratio)
    assert sum(got) == total
    assert got[0] == n_max and got[-1] == int(n_max / ratio)
    if counts:
        assert got == counts


def test_digits_manifest():
    manifest = build_manifest(digits())
    smallest = 174  # the smallest digits class: every class can supply n_max images
    assert manifest["class_counts"] == exponential_counts(smallest, 10, 10)
    assert manifest["num_images"] == len(manifest["indices"]) == sum(manifest["class_counts"])
    assert manifest["image_shape"] == [8, 8, 1]
    data = load_training_set(manifest)
    assert np.bincount(data.labels).tolist() == manifest["class_counts"]
    assert data.images.dtype == np.uint8 and data.images.max() == 255


def test_same_seed_same_indices_other_seed_other_indices():
    assert build_manifest(digits(seed=0))["indices"] == build_manifest(digits(seed=0))["indices"]
    assert build_manifest(digits(seed=1))["indices"] != build_manifest(digits(seed=0))["indices"]


def test_selection_keeps_first_n_of_a_per_class_permutation():
    labels = np.repeat(np.arange(3), 10)
    idx = select_long_tailed(labels, [10, 4, 1], seed=3)
    assert np.bincount(labels[idx]).tolist() == [10, 4, 1]
    assert len(set(idx.tolist())) == len(idx)


def public_split_indices(targets: np.ndarray, ratio: float, seed: int = 0) -> list[int]:
    """LDAM-DRW's ImbalanceCIFAR (gen_imbalanced_data), written out independently: global legacy
    seed once, then per class shuffle np.where(targets == c)[0] and keep the first n_c."""
    classes = np.unique(targets)
    n_max = len(targets) // len(classes)
    counts = [int(n_max * (1 / ratio) ** (c / (len(classes) - 1))) for c in range(len(classes))]
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        selected = []
        for the_class, the_img_num in zip(classes, counts):
            idx = np.where(targets == the_class)[0]
            np.random.shuffle(idx)
            selected.extend(idx[:the_img_num].tolist())
    finally:
        np.random.set_state(state)
    return selected


@pytest.mark.skipif(not OFFICIAL_LABELS.is_file(), reason=f"{OFFICIAL_LABELS} (CIFAR labels, official order) absent")
@pytest.mark.parametrize("name, ratio, total", [
    ("cifar10_train", 100, 12406), ("cifar10_train", 50, 13996),
    ("cifar100_train", 100, 10847), ("cifar100_train", 50, 12608),
])
def test_paper_subsets_are_the_public_splits_image_for_image(tmp_path, name, ratio, total):
    """On CIFAR's official order the manifest keeps exactly the images of the published splits."""
    targets = np.load(OFFICIAL_LABELS)[name]
    path = tmp_path / "labels_only.npz"  # one-pixel images: the selection depends on the labels alone
    np.savez(path, images=np.zeros((len(targets), 1, 1, 3), np.uint8), labels=targets)
    manifest = build_manifest({**digits(ratio=ratio), "source": "npz", "path": str(path)})
    assert manifest["num_images"] == total
    assert manifest["indices"] == public_split_indices(targets, ratio)


def test_many_medium_few_are_thirds_by_count():
    assert many_medium_few([5, 50, 7, 9, 40, 1]) == {"many": [1, 4], "medium": [3, 2], "few": [0, 5]}
    split = many_medium_few(exponential_counts(500, 100, 100))
    assert [len(v) for v in split.values()] == [34, 33, 33]


def test_ratio_that_empties_a_class_is_an_error():
    with pytest.raises(ValueError, match=r"imbalance_ratio = 50 leaves class\(es\) \[3\] without an image"):
        profile_counts(digits(ratio=50), np.full(4, 20))
    with pytest.raises(DataError, match="without an image"):
        build_manifest(digits(ratio=1000))


def test_changed_source_is_detected(tmp_path):
    path = tmp_path / "set.npz"
    images = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.repeat(np.arange(4), 10))
    manifest = build_manifest({**digits(ratio=2), "source": "npz", "path": str(path)})
    assert load_training_set(manifest).images.shape[1:] == (4, 4, 3)
    images[0] ^= 1
    np.savez(path, images=images, labels=np.repeat(np.arange(4), 10))
    with pytest.raises(DataError, match="differ"):
        load_training_set(manifest)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 2, 2, 1), np.uint8)}, r"missing array\(s\) \['labels'\]"),
    ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.arange(4)}, "must be uint8 of shape"),
    ({"images": np.zeros((4, 2, 2, 1), np.float32), "labels": np.arange(4)}, "must be uint8"),
    ({"images": np.zeros((4, 2, 2, 1), np.uint8), "labels": np.array([0, 2, 2, 0])}, "without gaps"),
])
def test_malformed_npz_is_named(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        build_manifest({**digits(), "source": "npz", "path": str(path)})
    assert str(path) in str(info.value)


def test_missing_npz_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        build_manifest({**digits(), "source": "npz", "path": str(tmp_path / "none.npz")})


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="the CIFAR-10 copy in ../shared is not here")
def test_cifar10_lt_from_npz_has_published_counts():
    manifest = build_manifest({**digits(ratio=100), "source": "npz", "path": str(SHARED_CIFAR)})
    assert manifest["class_counts"] == CIFAR10_LT_100
    assert manifest["num_images"] == 12406
    assert manifest["class_names"][0] == "airplane"


@pytest.mark.parametrize("settings, available, expected", [
    ({"profile": "step", "imbalance_ratio": 10, "step_fraction": 0.5}, [100] * 4, [100, 100, 10, 10]),
    ({"profile": "step", "imbalance_ratio": 100, "step_fraction": 0.3}, [5000] * 10, [5000] * 7 + [50] * 3),
    ({"profile": "two_class", "imbalance_ratio": 100}, [30000, 40000], [30000, 300]),
    ({"profile": "explicit", "class_counts": [7, 1, 3]}, [10, 10, 10], [7, 1, 3]),
])
def test_other_profiles(settings, available, expected):
    assert profile_counts(digits(**settings), np.array(available)) == expected


@pytest.mark.parametrize("settings, available, message", [
    ({"profile": "two_class"}, [10, 10, 10], "needs a source with 2 classes, this one has 3"),
    ({"profile": "explicit", "class_counts": [1, 2]}, [10, 10, 10], "has 2 entries, the source has 3 classes"),
    ({"profile": "explicit", "class_counts": [1, 20, 3]}, [10, 10, 10], "asks class 1 for 20 images"),
])
def test_profile_mistakes(settings, available, message):
    with pytest.raises(ValueError, match=message):
        profile_counts(digits(**settings), np.array(available))


def test_step_profile_manifest_on_digits():
    manifest = build_manifest(digits(ratio=10, profile="step"))
    assert manifest["class_counts"] == [174] * 5 + [17] * 5


@pytest.mark.parametrize("source, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_torchvision_copy_says_how_to_provide_one(tmp_path, source, folder):
    with pytest.raises(DataError, match=rf"data.path = '{tmp_path}': no readable {source} copy") as info:
        build_manifest(digits(source=source, path=str(tmp_path)))
    assert f"'{folder}/'" in str(info.value) and "data.download: true" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def write_folder(root, sizes):
    from PIL import Image

    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), color=(10 * i, 20, 30)).save(root / name / f"{i}.png")


def test_imagefolder_classes_are_sorted_folders(tmp_path):
    write_folder(tmp_path, {"male": [(6, 4)] * 2, "female": [(6, 4)] * 5})
    manifest = build_manifest(digits(source="imagefolder", path=str(tmp_path), profile="two_class", ratio=2))
    assert manifest["class_names"] == ["female", "male"]
    assert manifest["class_counts"] == [2, 1] and manifest["image_shape"] == [4, 6, 3]


def test_class_names_without_reading_images_equal_the_loaded_sources(tmp_path):
    from cm.data.sources import load_source, source_class_names

    write_folder(tmp_path, {"ukiyo_e": [(6, 4)] * 2, "baroque": [(6, 4)] * 3})
    for data in (digits(), digits(source="imagefolder", path=str(tmp_path), profile="two_class", ratio=2)):
        assert source_class_names(data) == load_source(data).class_names
    assert source_class_names(digits(source="imagefolder", path=str(tmp_path))) == ["baroque", "ukiyo_e"]


@pytest.mark.parametrize("sizes, message", [
    ({"a": [(4, 4), (5, 4)], "b": [(4, 4)]}, r"1.png: 5x4 pixels, the first image was 4x4"),
    ({"a": [(4, 4)], "b": []}, r"b: no images"),
    ({"a": [(4, 4)]}, r"found 1 class folder"),
])
def test_imagefolder_mistakes_name_the_file(tmp_path, sizes, message):
    write_folder(tmp_path, sizes)
    with pytest.raises(DataError, match=message):
        build_manifest(digits(source="imagefolder", path=str(tmp_path), ratio=1))


def test_an_inverted_shift_keeps_the_subset_and_inverts_its_pixels():
    data = {"source": "digits", "profile": "exponential", "imbalance_ratio": 10, "seed": 0}
    plain, inverted = build_manifest(data), build_manifest({**data, "shift": "invert"})
    assert "shift" not in plain["source"]  # unshifted manifests are the bytes they were
    assert inverted["source"]["shift"] == "invert" and inverted["indices"] == plain["indices"]
    assert inverted["content_sha256"] != plain["content_sha256"]
    a, b = load_training_set(plain), load_training_set(inverted)
    assert np.array_equal(b.images.astype(int), 255 - a.images.astype(int)) and np.array_equal(a.labels, b.labels)
