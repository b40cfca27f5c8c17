"""The local feature network: shapes, persistence, and a short training run on digits."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cm.data.images import to_model_range
from cm.metrics.feature_net import (
    FeatureNet,
    _random_shift,
    extract,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    images = (d.data * 255 / 16).round().astype(np.uint8).reshape(-1, 8, 8, 1)  # (1797, 8, 8, 1)
    return images, d.target


@pytest.mark.parametrize("c, size", [(1, 8), (3, 32)])
def test_shapes_and_config(c, size):
    torch.manual_seed(0)
    net = FeatureNet(in_channels=c, image_size=size, num_classes=7, feature_dim=16, width=8)
    x = torch.rand(5, c, size, size) * 2 - 1
    assert net.features(x).shape == (5, 16)
    assert net(x).shape == (5, 7)
    rebuilt = FeatureNet(**net.config)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), net(x))


def test_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        FeatureNet(image_size=12)


def test_extract_types_and_batch_independence():
    net = FeatureNet(in_channels=3, image_size=8, num_classes=4, feature_dim=12, width=8)
    images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    feats, pred = extract(net, images, batch_size=10)
    assert feats.shape == (37, 12) and feats.dtype == np.float64
    assert pred.shape == (37,) and pred.dtype == np.int64
    with torch.no_grad():
        logits = net(to_model_range(images))
    np.testing.assert_array_equal(pred, logits.argmax(1).numpy())
    np.testing.assert_allclose(extract(net, images, batch_size=512)[0], feats, rtol=1e-5, atol=1e-6)


def test_random_shift_is_a_translation():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = _random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(2):  # each output must equal some 8x8 window of the padded image
        assert any(
            torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5)
        )


def test_save_load_round_trip(tmp_path):
    net = FeatureNet(in_channels=1, image_size=8, num_classes=3, feature_dim=10, width=8)
    report = {"test_accuracy": 0.5, "per_class_test_accuracy": [0.1, float("nan"), 1.0], "train_size": 4}
    path = tmp_path / "net.pt"
    save_feature_net(net, report, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]  # no temp file left behind
    loaded, loaded_report = load_feature_net(path)
    assert loaded.config == net.config and not loaded.training
    assert loaded_report["per_class_test_accuracy"][0] == 0.1 and np.isnan(loaded_report["per_class_test_accuracy"][1])
    images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)
    for a, b in zip(extract(net, images), extract(loaded, images)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_payload"])
def test_corrupt_file_names_path(tmp_path, damage):
    path = tmp_path / "net.pt"
    save_feature_net(FeatureNet(width=8), {}, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="net.pt"):
        load_feature_net(path)


def test_training_on_digits(digits):
    images, labels = digits
    rng_state = torch.get_rng_state()
    net, report = train_feature_net(
        images, labels, num_classes=10, steps=200, batch_size=128, lr=2e-3, seed=0, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng_state)  # global torch RNG untouched
    assert not net.training
    assert report["train_size"] + report["test_size"] == len(images)
    assert report["test_size"] == pytest.approx(0.2 * len(images), abs=1)
    assert report["test_accuracy"] > 0.8  # chance is 0.1
    assert len(report["per_class_test_accuracy"]) == 10
    # The report must agree with an independent evaluation: mean of per-class accuracies
    # weighted by the (stratified) per-class test counts reproduces overall accuracy.
    counts = np.round(np.bincount(labels) * 0.2)
    weighted = np.dot(report["per_class_test_accuracy"], counts) / counts.sum()
    assert weighted == pytest.approx(report["test_accuracy"], abs=0.01)


def test_training_is_deterministic(digits):
    images, labels = digits
    kw = dict(num_classes=10, steps=5, batch_size=32, lr=1e-3, progress=False, augment=True, width=8)
    a, ra = train_feature_net(images[:300], labels[:300], seed=1, **kw)
    b, rb = train_feature_net(images[:300], labels[:300], seed=1, **kw)
    c, _ = train_feature_net(images[:300], labels[:300], seed=2, **kw)
    assert ra == rb
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
