"""The two fid_modes: each resize against an independent computation on real CIFAR images, the
weights files' hash and format checks, and pytorch-fid's network built without network access.

No Inception weights exist here: a recording stand-in takes the network's place for the resize
tests, fake files for the hash tests, and randomly initialised weights of the right shapes for
building pytorch-fid's network.
"""

from __future__ import annotations

import dataclasses
import urllib.request

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cm import io
from cm.metrics import inception
from cm.metrics.inception import inception_features, load_inception
from tests.conftest import SHARED_CIFAR

needs_cifar = pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"the CIFAR-10 copy {SHARED_CIFAR} is not here")


class Recorder(nn.Module):
    """Stands in for a network: keeps every batch it is fed, returns (B, 48) pooled values."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 10)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    def seen(self) -> np.ndarray:
        """Everything fed so far, (N, 299, 299, 3) float64."""
        return torch.cat(self.inputs).permute(0, 2, 3, 1).double().numpy()


@pytest.fixture(scope="module")
def cifar():
    """Six real CIFAR-10 training images (uint8, 32x32 RGB), two classes apart each."""
    with np.load(SHARED_CIFAR) as archive:
        return archive["images"][::10_000][:5].copy()


def pil_bicubic(image: np.ndarray) -> np.ndarray:
    """Mode clean by hand: PIL bicubic of each channel as a float32 image, clipped to [0, 255]
    (clean-fid 0.1.35 clips after resizing)."""
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize(
        (299, 299), resample=Image.BICUBIC)) for c in range(image.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float64)


def bilinear_half_pixel(image: np.ndarray, size: int = 299) -> np.ndarray:
    """Mode legacy_pytorch by hand, in float64: bilinear interpolation with half-pixel centres
    (align_corners=False). Output pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped
    below at 0 (as PyTorch does for linear modes); neighbours beyond the last pixel repeat it."""
    def weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((size, n_in))
        np.add.at(w, (np.arange(size), lo), 1 - frac)
        np.add.at(w, (np.arange(size), hi), frac)
        return w  # (size, n_in), rows sum to 1

    rows, cols = weights(image.shape[0]), weights(image.shape[1])
    along_rows = np.einsum("ih,hwc->iwc", rows, image.astype(np.float64))
    return np.einsum("jw,iwc->ijc", cols, along_rows)


@needs_cifar
def test_clean_resize_is_pil_bicubic_per_channel_on_float32(cifar):
    net = Recorder()
    inception_features(net, cifar, batch_size=2, mode="clean")
    want = np.stack([pil_bicubic(img) for img in cifar])
    np.testing.assert_array_equal(net.seen(), want)  # the same PIL operation: bit-identical
    # Float input in [0, 1] is scaled to [0, 255] without rounding, then resized the same way.
    unit = cifar.astype(np.float32) / 255
    net = Recorder()
    inception_features(net, unit, mode="clean")
    np.testing.assert_allclose(net.seen(), np.stack([pil_bicubic(img * np.float32(255)) for img in unit]),
                               rtol=0, atol=1e-3)


@needs_cifar
def test_legacy_pytorch_resize_is_half_pixel_bilinear_on_float_images(cifar):
    rng = np.random.default_rng(0)
    # Off the uint8 grid, as unquantised samples are: rounding anywhere would show.
    unit = np.clip(cifar / 255 + rng.uniform(-0.5, 0.5, cifar.shape) / 255, 0, 1).astype(np.float32)
    net = Recorder()
    inception_features(net, unit, batch_size=4, mode="legacy_pytorch")
    got = net.seen()
    want = np.stack([bilinear_half_pixel(img.astype(np.float64) * 255) for img in unit])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)  # float32 arithmetic in PyTorch
    quantised = np.stack([bilinear_half_pixel(np.rint(img.astype(np.float64) * 255)) for img in unit])
    assert np.abs(got - quantised).max() > 0.2  # the float values were used, not rounded ones
    # uint8 input: the same resize of the integer values.
    net = Recorder()
    inception_features(net, cifar, mode="legacy_pytorch")
    np.testing.assert_allclose(net.seen(), np.stack([bilinear_half_pixel(img) for img in cifar]),
                               rtol=0, atol=1e-3)
    # The two modes are different resizes (bicubic overshoots edges, bilinear cannot).
    clean = Recorder()
    inception_features(clean, cifar, mode="clean")
    assert np.abs(clean.seen() - net.seen()).max() > 5


def test_network_and_resize_modes_must_agree():
    net = Recorder()
    net.fid_mode = "legacy_pytorch"
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="loaded for evaluate.fid_mode legacy_pytorch, but resizing for clean"):
        inception_features(net, images, mode="clean")
    inception_features(net, images)  # the network's own mode by default
    with pytest.raises(ValueError, match="'bilinear' is not allowed"):
        inception_features(Recorder(), images, mode="bilinear")


def test_published_hashes_follow_the_file_names():
    legacy = inception.WEIGHTS["legacy_pytorch"]
    # torch hub convention: the file name carries the first 8 hex digits of its sha256.
    assert legacy.name == f"pt_inception-2015-12-05-{legacy.sha256[:8]}.pth"
    assert legacy.url.endswith("/" + legacy.name)
    assert inception.WEIGHTS["clean"].url.endswith("/" + inception.WEIGHTS_NAME)
    for w in inception.WEIGHTS.values():
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0


def one_line_error(path, mode) -> str:
    with pytest.raises(io.CorruptFileError) as err:
        load_inception(path, mode=mode)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch"])
def test_wrong_hash_or_format_names_file_expected_hash_and_source(tmp_path, mode):
    expected = inception.WEIGHTS[mode]
    before = {}
    files = {
        "wrong_hash.bin": (lambda p: p.write_bytes(b"\0" * 1000), "not a PyTorch file"),
        "script.pt": (lambda p: torch.jit.save(torch.jit.script(nn.Linear(2, 2)), p), "a TorchScript model"),
        "state.pth": (lambda p: torch.save(nn.Linear(2, 2).state_dict(), p), "a torch.save file"),
        "old_state.pth": (lambda p: torch.save(nn.Linear(2, 2).state_dict(), p, _use_new_zipfile_serialization=False),
                          "a torch.save file (legacy format)"),
    }
    for name, (write, kind) in files.items():
        path = tmp_path / name
        write(path)
        before[name] = path.read_bytes()
        msg = one_line_error(path, mode)
        assert msg.startswith(f"{path}: not {expected.what} for evaluate.fid_mode {mode} ({kind}, sha256 ")
        assert f"expected {expected.name} with sha256 {expected.sha256}" in msg and expected.url in msg
        assert "evaluate.inception_weights" in msg
    assert {name: (tmp_path / name).read_bytes() for name in files} == before  # nothing touched


def test_the_other_modes_file_is_named_as_such(tmp_path, monkeypatch):
    """Given clean-fid's file where pytorch-fid's is needed, say so (faked: no real file here)."""
    fake = tmp_path / "inception-2015-12-05.pt"
    fake.write_bytes(b"clean-fid's bytes")
    monkeypatch.setitem(inception.WEIGHTS, "clean", dataclasses.replace(
        inception.WEIGHTS["clean"], sha256=io.file_sha256(fake)))
    msg = one_line_error(fake, "legacy_pytorch")
    assert "(clean-fid's TorchScript Inception, the file of evaluate.fid_mode clean;" in msg
    assert inception.WEIGHTS["legacy_pytorch"].sha256 in msg


@pytest.fixture(scope="module")
def fake_pytorch_fid_weights(tmp_path_factory):
    """A file in pytorch-fid's format (torchvision's Inception-v3 with 1008 classes and no aux
    head: the same keys and shapes), with random weights."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("weights") / "my_pt_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_pytorch_fid_network_loads_a_local_file_without_network(fake_pytorch_fid_weights, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    path = fake_pytorch_fid_weights
    with pytest.raises(io.CorruptFileError, match="a torch.save file"):  # the real hash is enforced
        load_inception(path, mode="legacy_pytorch")
    monkeypatch.setitem(inception.WEIGHTS, "legacy_pytorch", dataclasses.replace(
        inception.WEIGHTS["legacy_pytorch"], sha256=io.file_sha256(path)))
    net = load_inception(path, mode="legacy_pytorch")
    assert (net.fid_mode, net.weights_file, net.weights_sha256) == ("legacy_pytorch", str(path),
                                                                   io.file_sha256(path))
    assert not net.training and not any(p.requires_grad for p in net.net.parameters())
    state = torch.load(path, weights_only=True)
    block0, block3 = net.net.blocks[0], net.net.blocks[3]  # clean-fid's InceptionV3, pool3 output
    torch.testing.assert_close(block0[0].conv.weight, state["Conv2d_1a_3x3.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(block3[2].branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"],
                               rtol=0, atol=0)
    torch.testing.assert_close(net.fc.weight, state["fc.weight"], rtol=0, atol=0)
    assert type(block3[2]).__name__ == "FIDInceptionE_2"  # pytorch-fid's patched blocks, not torchvision's

    rng = np.random.default_rng(0)
    images = rng.random((2, 12, 12, 3), dtype=np.float32)
    feats, logits = inception_features(net, images, logits=True)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.std() > 0
    np.testing.assert_allclose(logits, feats @ state["fc.weight"].double().numpy().T, rtol=1e-4, atol=1e-4)
    # The network sees [0, 255] and divides by 255, as clean-fid's legacy_pytorch extractor does.
    x = torch.rand(1, 3, 299, 299) * 255
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.net(x / 255)[0].flatten(1))
