"""ImageNet-LT from split lists over an image folder, image resizing, and the CelebA-HQ folder route.

A tiny fake ImageNet (real PNG files under train/<wnid>/ and val/<wnid>/) and its lists are written
here; every expectation is counted from the lines written, never taken from the code under test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cm import config as cfg
from cm.data import DataError, build_manifest, load_reference, load_training_set
from cm.evaluate import dataset_id
from tests.conftest import ROOT
from tests.helpers import stand_in_inception_weights

CIFAR_TEST = ROOT.parent / "shared" / "data" / "cifar10" / "test.npz"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
TRAIN_COUNTS = [6, 3, 2, 1]  # long-tailed, class 0 the head
REFERENCE_PER_CLASS = 2


def pixels(n: int) -> np.ndarray:
    """n real 32x32 RGB images (CIFAR-10's test set when the shared copy is here, else seeded noise)."""
    if CIFAR_TEST.is_file():
        with np.load(CIFAR_TEST) as archive:
            return archive["images"][:n]
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_list(path: Path, lines: list[tuple[str, int]]) -> Path:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in lines))
    return path


def write_folders(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> None:
    """Class folders of JPEG files of the given (width, height)."""
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), color=(10 * i, 20, 30)).save(root / name / f"{i}.jpg")


def folder_data(root: Path, **more) -> dict:
    """`data` settings of the CelebA-HQ route (imagefolder, two_class, 8 px) over `root`."""
    return {"source": "imagefolder", "path": str(root), "download": False, "profile": "two_class",
            "imbalance_ratio": 2, "seed": 0, "hflip": True, "step_fraction": 0.5, "class_counts": None,
            "split_list": None, "reference_list": None, "image_size": 8, **more}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A fake ImageNet root, a shuffled long-tailed train list and a balanced reference list."""
    base = tmp_path_factory.mktemp("imagenet")
    root = base / "imagenet"
    balanced = [REFERENCE_PER_CLASS] * len(WNIDS)
    images = iter(pixels(sum(TRAIN_COUNTS) + sum(balanced)))
    train, reference, written = [], [], {}
    for split, per_class, lines in (("train", TRAIN_COUNTS, train), ("val", balanced, reference)):
        for label, (wnid, n) in enumerate(zip(WNIDS, per_class)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                rel = f"{split}/{wnid}/{wnid}_{i}.png"
                written[rel] = next(images)
                Image.fromarray(written[rel]).save(root / rel)
                lines.append((rel, label))
    order = np.random.default_rng(1).permutation(len(train))  # classes interleaved, as in the published list
    train = [train[i] for i in order]
    return {"root": root, "train": train, "reference": reference, "written": written,
            "train_list": write_list(base / "ImageNet_LT_train.txt", train),
            "reference_list": write_list(base / "ImageNet_LT_test.txt", reference)}


# `data` settings of an imagenet_lt experiment as the schema completes them, less path and split_list.
LT_DEFAULTS = {"source": "imagenet_lt", "download": False, "profile": "listed", "imbalance_ratio": 100, "seed": 0,
               "hflip": True, "step_fraction": 0.5, "class_counts": None, "reference_list": None, "image_size": None}


def lt_data(fake, **more) -> dict:
    """`data` settings of the fake ImageNet-LT."""
    return {**LT_DEFAULTS, "path": str(fake["root"]), "split_list": str(fake["train_list"]), **more}


def test_manifest_follows_the_list(fake):
    labels = [label for _, label in fake["train"]]
    manifest = build_manifest(lt_data(fake))
    counted = Counter(labels)
    assert manifest["class_counts"] == [counted[c] for c in range(len(WNIDS))] == TRAIN_COUNTS
    assert manifest["num_images"] == len(fake["train"])
    # every listed image, grouped by class, in list order within a class
    assert manifest["indices"] == [i for c in range(len(WNIDS)) for i, label in enumerate(labels) if label == c]
    assert manifest["class_names"] == WNIDS and manifest["image_shape"] == [32, 32, 3]
    assert manifest["imbalance_ratio"] == TRAIN_COUNTS[0] / TRAIN_COUNTS[-1]

    data = load_training_set(manifest)
    expected = [fake["train"][i] for i in manifest["indices"]]
    assert data.labels.tolist() == [label for _, label in expected]
    assert np.array_equal(data.images, np.stack([fake["written"][rel] for rel, _ in expected]))  # lossless PNG


def test_same_settings_give_the_same_manifest(fake):
    assert build_manifest(lt_data(fake, image_size=8)) == build_manifest(lt_data(fake, image_size=8))


@pytest.mark.parametrize("size", [8, 16])
def test_image_size_resizes_every_image(fake, size):
    manifest = build_manifest(lt_data(fake, image_size=size))
    assert manifest["image_shape"] == [size, size, 3]
    assert load_training_set(manifest).images.shape == (len(fake["train"]), size, size, 3)


def test_non_square_images_are_centre_cropped_not_stretched(tmp_path):
    bands = np.zeros((10, 30, 3), np.uint8)  # red | green | blue thirds; the centred square is green
    bands[:, :10, 0] = bands[:, 10:20, 1] = bands[:, 20:, 2] = 255
    for wnid in WNIDS[:2]:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.fromarray(bands).save(tmp_path / "train" / wnid / "a.png")
    lines = [(f"train/{wnid}/a.png", c) for c, wnid in enumerate(WNIDS[:2])]
    data = {**lt_data({"root": tmp_path, "train_list": write_list(tmp_path / "l.txt", lines)}), "image_size": 5}
    images = load_training_set(build_manifest(data)).images
    assert images.shape == (2, 5, 5, 3)
    assert (images == [0, 255, 0]).all()


def test_reference_list_is_the_balanced_evaluation_set(fake):
    data = lt_data(fake, reference_list=str(fake["reference_list"]), image_size=8)
    reference = load_reference(data)
    assert np.bincount(reference.labels).tolist() == [REFERENCE_PER_CLASS] * len(WNIDS)
    assert reference.labels.tolist() == [label for _, label in fake["reference"]]
    assert reference.images.shape == (len(fake["reference"]), 8, 8, 3)
    # without a reference list the reference is the split list's own images
    assert np.bincount(load_reference(lt_data(fake)).labels).tolist() == TRAIN_COUNTS
    # statistics of another reference or size are never taken for these
    assert len({dataset_id(data), dataset_id(lt_data(fake)), dataset_id(lt_data(fake, image_size=8))}) == 3


def params_with(data: dict, name: str = "imagenetlt_32") -> dict:
    """params.yaml running one paper entry, its data settings replaced (paths absolute)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["run"] = [name]
    raw["experiments"][name]["data"].update(data)
    return raw


def fails(route: str, data: dict, message: str, name: str = "imagenetlt_32") -> None:
    """The mistake is found with `message`, before any job (config check) or at load."""
    data = {"reference_list": None, **data}
    with pytest.raises(ValueError, match=message) as info:
        if route == "check":
            cfg.check_params(params_with(data, name), base_dir=ROOT)
        else:
            build_manifest({**LT_DEFAULTS, **data})
    assert isinstance(info.value, cfg.ConfigError if route == "check" else DataError)
    assert "\n" not in str(info.value)


def test_paper_entries_pass_the_check_on_real_files(fake, tmp_path, monkeypatch):
    weights = str(stand_in_inception_weights(monkeypatch, tmp_path))
    raw = params_with({"path": str(fake["root"]), "split_list": str(fake["train_list"]),
                       "reference_list": str(fake["reference_list"])})
    raw["experiments"]["imagenetlt_32"]["evaluate"]["inception_weights"] = weights
    params = cfg.check_params(raw, base_dir=ROOT)
    assert params["experiments"]["imagenetlt_32"]["data"]["image_size"] == 32
    (tmp_path / "celebahq").mkdir()
    write_folders(tmp_path / "celebahq", {"female": [(12, 9)] * 101, "male": [(9, 12)] * 100})  # ratio 100: male 1
    raw = params_with({"path": str(tmp_path / "celebahq")}, "celebahq_ir100")
    raw["experiments"]["celebahq_ir100"]["evaluate"]["inception_weights"] = weights
    cfg.check_params(raw, base_dir=ROOT)


def test_paper_entries_generate_50k_images():
    experiments = yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"]
    assert experiments["celebahq_ir100"]["sample"]["per_class"] * 2 == 50_000
    for name, size in (("imagenetlt_32", 32), ("imagenetlt_64", 64)):
        assert experiments[name]["sample"]["per_class"] * 1000 == 50_000
        assert experiments[name]["data"]["image_size"] == size


@pytest.mark.parametrize("route", ["check", "load"])
def test_missing_root_or_list(fake, tmp_path, route):
    missing_root = "not found; must be the ImageNet folder" if route == "check" else "not a folder"
    fails(route, {"path": str(tmp_path / "none"), "split_list": str(fake["train_list"])},
          rf"data.path = '{re.escape(str(tmp_path / 'none'))}': {missing_root}")
    fails(route, {"path": str(fake["root"]), "split_list": str(tmp_path / "none.txt")},
          rf"data.split_list = '{re.escape(str(tmp_path / 'none.txt'))}': file not found; must be a split list")
    fails(route, {"path": str(fake["root"]), "split_list": None},
          "data.split_list = None is not allowed with data.source = 'imagenet_lt': must name a split list")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("route", ["check", "load"])
@pytest.mark.parametrize("bad", ["train/n01440764/x.png", "train/n01440764/x.png -1", "a b c",
                                 "train/n01440764/x.png one"])
def test_malformed_line_is_named(fake, tmp_path, route, bad):
    write_list(tmp_path / "list.txt", fake["train"][:2])
    with (tmp_path / "list.txt").open("a") as fh:
        fh.write(bad + "\n")
    fails(route, {"path": str(fake["root"]), "split_list": str(tmp_path / "list.txt")},
          rf"line 3: '{bad}' is not allowed: must be a path under data.path and an integer label")


@pytest.mark.parametrize("route", ["check", "load"])
def test_missing_listed_files_are_counted(fake, tmp_path, route):
    absent = [("train/n01440764/gone_1.JPEG", 0), ("train/n01443537/gone_2.JPEG", 1)]
    lines = fake["train"] + absent
    write_list(tmp_path / "list.txt", lines)
    fails(route, {"path": str(fake["root"]), "split_list": str(tmp_path / "list.txt")},
          rf"{len(absent)} of the {len(lines)} images listed in data.split_list do not exist, "
          rf"the first '{absent[0][0]}'")


@pytest.mark.parametrize("route", ["check", "load"])
def test_labels_must_cover_every_class(fake, tmp_path, route):
    lines = [(rel, label) for rel, label in fake["train"] if label != 1]  # class 1 never listed
    write_list(tmp_path / "list.txt", lines)
    fails(route, {"path": str(fake["root"]), "split_list": str(tmp_path / "list.txt")},
          rf"labels must cover 0..{len(WNIDS) - 1} \(every class at least one image\); 1 missing, the first 1")


@pytest.mark.parametrize("route", ["check", "load"])
def test_reference_list_must_have_the_split_lists_classes(fake, tmp_path, route):
    write_list(tmp_path / "ref.txt", fake["reference"][:1] + [(fake["reference"][1][0], 7)])
    data = {"path": str(fake["root"]), "split_list": str(fake["train_list"]),
            "reference_list": str(tmp_path / "ref.txt")}
    if route == "check":
        fails(route, data, rf"data.reference_list = .*: label 7 is not allowed: must be 0..{len(WNIDS) - 1}")
    else:
        with pytest.raises(DataError, match="label 7 is not allowed"):
            load_reference({**lt_data(fake), **data})


@pytest.mark.parametrize("route", ["check", "load"])
def test_imagenet_lt_keeps_its_list(fake, route):
    fails(route, {"path": str(fake["root"]), "split_list": str(fake["train_list"]), "profile": "exponential"},
          "data.profile = 'exponential' is not allowed with data.source = 'imagenet_lt': must be listed")


@pytest.mark.parametrize("route", ["check", "load"])
def test_list_keys_are_refused_for_other_sources(fake, route):
    fails(route, {"source": "digits", "path": None, "split_list": str(fake["train_list"]), "image_size": None},
          r"data.split_list = .* is not allowed with data.source = 'digits': must be null \(only imagenet_lt")


def test_celebahq_route_two_class_female_head_resized(tmp_path):
    sizes = {"male": [(20, 12), (12, 20)], "female": [(30, 17)] * 5}  # unequal, non-square native sizes
    write_folders(tmp_path, sizes)
    manifest = build_manifest(folder_data(tmp_path))
    n_max = min(len(shapes) for shapes in sizes.values())  # docs/experiments.md: n_max is the smallest class
    assert manifest["class_names"] == ["female", "male"]  # sorted: female is class 0, the head
    assert manifest["class_counts"] == [n_max, int(n_max / 2)]
    assert manifest["image_shape"] == [8, 8, 3]
    assert load_training_set(manifest).images.shape == (n_max + int(n_max / 2), 8, 8, 3)


@pytest.mark.parametrize("route", ["check", "load"])
@pytest.mark.parametrize("layout, message", [
    (None, "not a folder; imagefolder needs a folder with one sub-folder of images per class"),
    ({".": [(4, 4)] * 3}, r"3 image file\(s\) but no class sub-folders; imagefolder needs"),
    ({"female": [(4, 4)], "male": []}, "male: no images; each class folder must hold at least one file"),
    ({"female": [(4, 4)], "male": [(4, 4)], "other": [(4, 4)]},
     "data.profile = 'two_class' needs a source with 2 classes, this one has 3"),
])
def test_imagefolder_mistakes(tmp_path, route, layout, message):
    root = tmp_path / "celebahq"
    if layout is not None:
        root.mkdir()
        write_folders(root, {k: v for k, v in layout.items() if k != "."})
        for i, (w, h) in enumerate(layout.get(".", [])):
            Image.new("RGB", (w, h)).save(root / f"{i}.png")
    before = sorted(tmp_path.rglob("*"))
    if route == "check":
        if layout is None:
            message = "data.path = .*: not found; must be a folder with one sub-folder of images per class"
        fails(route, {"path": str(root)}, message, name="celebahq_ir100")
    else:
        with pytest.raises(DataError, match=message):
            build_manifest(folder_data(root))
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_a_mistake_ends_cm_check_in_one_line(fake, tmp_path):
    params = params_with({"path": str(fake["root"]), "split_list": str(tmp_path / "none.txt")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "cm", "check", "--params", str(tmp_path / "params.yaml")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "experiments.imagenetlt_32.data: data.split_list" in line and "file not found" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
