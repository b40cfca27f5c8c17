"""Inception loading paths, clean-fid preprocessing and batching, and the Inception Score.

The real weights cannot be downloaded on the test machines, so the loading tests exercise the
missing/corrupt paths only, and ``inception_features`` runs with a small stand-in module in
place of the network. That stub is the only one in this file: it checks the input it receives
(float32 NCHW 299x299 in [0, 255]) and maps it to features deterministically, which is all the
preprocessing and batching code depends on. The two fid_modes' resizes against independent
computations on real images, the hash checks and pytorch-fid's network are in test_fid_modes.py.
"""

import numpy as np
import pytest
import torch
from cleanfid.fid import get_files_features
from torch import nn

from cm import io
from cm.metrics import inception
from cm.metrics.inception import inception_features, inception_score, load_inception


class StandIn(nn.Module):
    """Pretends to be InceptionV3W: (B, 3, 299, 299) -> (B, 48) features, plus base.output."""

    def __init__(self):
        super().__init__()
        self.base = nn.Module()
        self.base.output = nn.Linear(48, 10)
        with torch.no_grad():  # deterministic, without touching the global torch RNG
            self.base.output.weight.copy_(torch.linspace(-0.1, 0.1, 480).reshape(10, 48))
        self.seen = []

    def forward(self, x):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 299, 299), x.shape
        assert 0 <= x.min() and x.max() <= 255
        self.seen.append(len(x))
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 48)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)


def test_features_equal_clean_fid_pipeline(images, tmp_path):
    # clean-fid's own loader (ResizeDataset, mode "clean") on the same images saved as .npy files.
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"{i}.npy")
        np.save(files[-1], img)
    net = StandIn()
    want = get_files_features(files, model=net, num_workers=0, batch_size=3, device=torch.device("cpu"),
                              mode="clean", verbose=False)
    net.seen.clear()
    got = inception_features(net, images, batch_size=3)
    assert net.seen == [3, 3, 1]  # batching
    assert got.dtype == np.float64 and got.shape == (7, 48)
    np.testing.assert_array_equal(got, want.astype(np.float64))
    np.testing.assert_array_equal(inception_features(net, images, batch_size=5, num_workers=2), got)


def test_grayscale_and_logits(images):
    net = StandIn()
    gray = images[..., :1]
    np.testing.assert_array_equal(inception_features(net, gray), inception_features(net, np.repeat(gray, 3, -1)))
    feats, logits = inception_features(net, images, batch_size=4, logits=True)
    want = feats @ net.base.output.weight.detach().double().numpy().T  # no bias, as in the original IS
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-3)  # float32 network
    with pytest.raises(ValueError, match="base.output"):
        inception_features(nn.Identity(), images, logits=True)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        inception_features(net, images.astype(np.float32))  # 0..255 as floats: not the unit range
    with pytest.raises(ValueError, match="uint8 or float"):
        inception_features(net, images.astype(np.int16))
    nan = images / 255.0
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        inception_features(net, nan)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "CLEANFID_WEIGHTS", tmp_path / "nowhere" / inception.WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError) as err:
        load_inception(None)
    msg = str(err.value)
    assert "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt" in msg
    assert "evaluate.inception_weights" in msg and "nowhere" in msg
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist.*evaluate.inception_weights"):
        load_inception(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/{inception.WEIGHTS_NAME} does not exist"):
        load_inception(tmp_path)  # a folder without the file


def test_missing_legacy_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub_home"))  # pytorch-fid's place: torch hub's checkpoints
    expected = tmp_path / "hub_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert inception.default_location("legacy_pytorch") == expected
    with pytest.raises(FileNotFoundError) as err:
        load_inception(None, mode="legacy_pytorch")
    msg = str(err.value)
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in msg
    assert "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2" in msg
    assert str(expected) in msg and "evaluate.fid_mode legacy_pytorch" in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth does not exist"):
        load_inception(tmp_path, mode="legacy_pytorch")  # a folder without the mode's file
    with pytest.raises(ValueError, match="evaluate.fid_mode = 'legacy_tensorflow' is not allowed"):
        load_inception(tmp_path, mode="legacy_tensorflow")


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_corrupt_weights_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / inception.WEIGHTS_NAME
    bad.write_bytes(b"truncated download")
    for arg in (bad, tmp_path):  # the file itself, or its folder
        with pytest.raises(io.CorruptFileError, match=f"{bad}: not clean-fid's TorchScript Inception"):
            load_inception(arg)
    monkeypatch.setattr(inception, "CLEANFID_WEIGHTS", bad)
    with pytest.raises(io.CorruptFileError, match=str(bad)):
        load_inception(None)
    # A readable TorchScript file of some other model, under another name.
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), other)
    with pytest.raises(io.CorruptFileError, match=f"{other}: not clean-fid's"):
        load_inception(other)


def test_inception_score_closed_forms():
    assert inception_score(np.full((100, 8), 1 / 8), splits=10) == pytest.approx((1.0, 0.0))
    c, splits = 7, 5
    onehot = np.eye(c)[np.arange(c * splits * 3) % c]  # each split holds every class 3 times
    assert inception_score(onehot, splits=splits) == pytest.approx((c, 0.0))
    assert inception_score(np.log(onehot + 1e-300), splits=splits, from_logits=True) == pytest.approx((c, 0.0))
    assert inception_score(np.zeros((40, 3)), splits=4, from_logits=True) == pytest.approx((1.0, 0.0))


def test_inception_score_matches_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(60, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = [np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part])) for part in np.split(p, 3)]
    got = inception_score(logits, splits=3, from_logits=True)
    assert got == pytest.approx((np.mean(want), np.std(want)), rel=1e-10)
    assert inception_score(p, splits=3) == pytest.approx(got, rel=1e-10)
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(logits, splits=3)
    with pytest.raises(ValueError, match="splits"):
        inception_score(p, splits=61)


class FlagRecorder(StandIn):
    """Records the TF32 flags in force while the network runs."""

    def forward(self, x):
        self.flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        return super().forward(x)


def test_the_network_runs_in_float32_with_tf32_off_and_the_flags_come_back(images):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # On, as training with precision bf16 or tf32 leaves them on CUDA (cm.accel.configure_backends).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        net = FlagRecorder()
        inception_features(net, images, batch_size=4)
        assert net.flags == (False, False)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_evaluation_resizes_on_the_stages_threads(images, monkeypatch):
    """cm/threads.py gives torch resources.evaluate.threads; the resize pool takes that many."""
    from cm import evaluate

    calls = {}

    def features(extractor, imgs, **kwargs):
        calls.update(kwargs)
        return np.zeros((len(imgs), 48)), np.zeros((len(imgs), 10))

    net = StandIn()
    net.fid_mode, net.weights_file, net.weights_sha256 = "clean", "/x/inception-2015-12-05.pt", "0" * 64
    monkeypatch.setattr(inception, "inception_features", features)
    monkeypatch.setattr(inception, "load_inception", lambda *a, **k: net)
    monkeypatch.setattr(evaluate, "extract", lambda classifier, imgs, device: (None, np.zeros(len(imgs), int)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    experiment = {"evaluate": {"feature_extractor": "inception", "inception_weights": None, "fid_mode": "clean"}}
    evaluate.features(experiment, None, images, "cpu")
    assert calls["num_workers"] == 3
