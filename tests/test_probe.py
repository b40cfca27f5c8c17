"""Tests for the capacity probes (cm/probe): magnitude pruning, per-class losses, theta_g, gradient dominance.

Expected values come from numpy, closed forms or separate forward/backward passes, never from the probe itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cm import io
from cm.checkpoint import load_trained
from cm.diffusion import GaussianDiffusion
from cm.lowrank import add_lowrank_branches, branches
from cm.models import build_unet
from cm.probe import (
    as_model_inputs,
    compare_class_losses,
    gradient_dominance,
    noised_probe_batches,
    per_image_losses,
    prunable_weights,
    prune_smallest,
    pruning_probe,
    theta_g_probe,
)

DIFFUSION = GaussianDiffusion(timesteps=1000)


class PerClassLinear(nn.Module):
    """eps = W_y x_t: one bias-free linear map per class, so a class's loss depends on its own weights only."""

    def __init__(self, num_classes: int, pixels: int):
        super().__init__()
        self.num_classes = num_classes
        self.per_class = nn.ModuleList(nn.Linear(pixels, pixels, bias=False) for _ in range(num_classes))

    def forward(self, x, t, y):
        flat = x.flatten(1)
        out = torch.stack([m(flat) for m in self.per_class], dim=1)   # (N, classes, pixels)
        return out[torch.arange(len(x)), y].view_as(x)


class ZeroNoise(nn.Module):
    """Predicts eps = 0 whatever the input: its loss per pair is the mean of eps^2 over the pixels."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.unused = nn.Linear(2, 2)

    def forward(self, x, t, y):
        return torch.zeros_like(x)


class SharedAndScaled(nn.Module):
    """eps = W1 x_t + s_y W2 x_t: W1 is shared alike by every class, W2 is scaled per class by s_y."""

    def __init__(self, pixels: int, class_scales):
        super().__init__()
        self.num_classes = len(class_scales)
        self.shared = nn.Linear(pixels, pixels, bias=False)
        self.scaled = nn.Linear(pixels, pixels, bias=False)
        self.register_buffer("scales", torch.tensor(class_scales, dtype=torch.float32))

    def forward(self, x, t, y):
        flat = x.flatten(1)
        return (self.shared(flat) + self.scales[y, None] * self.scaled(flat)).view_as(x)


class ClassEmbedding(nn.Module):
    """eps = E[y] as an image, E a (classes, pixels) matrix at a large constant `value`. Class c's loss
    depends on row c alone, so the classes' gradients are orthogonal; row c's gradient over a batch of N is
    (2 / (N P)) sum over its n_c images of (E[c] - eps_i), of norm (2 / N) n_c value / sqrt(P) up to a
    relative 1 / (value sqrt(n_c P)) from the noise: proportional to the class's sample count."""

    def __init__(self, num_classes: int, image_shape, value: float = 1e3):
        super().__init__()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.table = nn.Parameter(torch.full((num_classes, math.prod(image_shape)), value))

    def forward(self, x, t, y):
        return self.table[y].view(len(y), *self.image_shape)


def random_images(counts, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    return torch.rand((len(labels), 1, size, size), generator=gen) * 2 - 1, labels


def tiny_unet(num_classes=4, cm=False, random_b=False, seed=0, ch=32):
    torch.manual_seed(seed)
    net = build_unet({"preset": "tiny", "ch": ch}, num_classes=num_classes, in_channels=1, image_size=8)
    # Undo the near-identity init (gain 1e-5 on the output conv) so every layer visibly moves the output.
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    if cm:
        add_lowrank_branches(net, 0.25)
        if random_b:
            gen = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for m in branches(net):
                    m.B.copy_(torch.randn(m.B.shape, generator=gen) * 0.05)
    return net


# ----------------------------------------------------------------------------------------------- pruning


def hand_made_net():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.Embedding(4, 3))
    with torch.no_grad():
        net[0].weight[0, :3] = 0.5      # ties, one of them set at the threshold for some fractions
        net[1].weight[0, 0, 0] = -0.5
    return net


def conv_linear_magnitudes(net):
    return np.concatenate([net[0].weight.detach().abs().numpy().ravel(), net[1].weight.detach().abs().numpy().ravel()])


@pytest.mark.parametrize("fraction", [0.05, 0.37, 0.5, 0.9])
def test_prune_smallest_zeroes_exactly_the_smallest_magnitudes(fraction):
    net = hand_made_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    magnitudes = conv_linear_magnitudes(net)
    assert (magnitudes > 0).all()
    k = round(fraction * magnitudes.size)

    info = prune_smallest(net, fraction)

    after = conv_linear_magnitudes(net)
    zeroed = after == 0
    assert zeroed.sum() == k == info.zeroed
    assert info.considered == magnitudes.size == 7 * 5 + 3 * 2 * 3 * 3
    # The zeroed elements are the k smallest (as a multiset: ties may fall either way), the rest are untouched.
    np.testing.assert_array_equal(np.sort(magnitudes[zeroed]), np.sort(magnitudes)[:k])
    np.testing.assert_array_equal(after[~zeroed], magnitudes[~zeroed])
    assert info.threshold == pytest.approx(float(np.sort(magnitudes)[k - 1]), rel=1e-7)
    for name in ("0.bias", "1.bias", "2.weight", "2.bias", "3.weight"):
        assert torch.equal(net.state_dict()[name], before[name]), name


def test_prune_all_scope_ranks_every_parameter_together():
    net = hand_made_net()
    all_params = np.concatenate([p.detach().abs().numpy().ravel() for p in net.parameters()])
    k = round(0.3 * all_params.size)
    info = prune_smallest(net, 0.3, scope="all")
    now = np.concatenate([p.detach().abs().numpy().ravel() for p in net.parameters()])
    # GroupNorm's bias starts at zero: already-zero elements are among the smallest and count as zeroed.
    assert info.zeroed == k and info.considered == all_params.size
    np.testing.assert_array_equal(np.sort(all_params[now == 0]), np.sort(all_params)[:k])


def test_scopes_select_the_right_tensors():
    net = hand_made_net()
    assert [name for name, _ in prunable_weights(net)] == ["0.weight", "1.weight"]
    assert [name for name, _ in prunable_weights(net, "all")] == [name for name, _ in net.named_parameters()]

    cm_net = tiny_unet(cm=True)
    selected = [name for name, _ in prunable_weights(cm_net)]
    assert "upblocks.0.conv1.base.weight" in selected and "head.weight" in selected
    assert "time_mlp.0.weight" in selected and "label_emb.weight" not in selected
    assert not [name for name in selected if name.endswith((".A", ".B"))]     # W_g only, never the branch
    everything = [name for name, _ in prunable_weights(cm_net, "all")]
    assert "upblocks.0.conv1.A" in everything and "upblocks.0.conv1.B" in everything


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), "0.5"])
def test_prune_rejects_a_fraction_outside_the_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="fraction"):
        prune_smallest(hand_made_net(), fraction)


def test_prune_rejects_unknown_and_empty_scopes():
    with pytest.raises(ValueError, match="conv_linear, all"):
        prune_smallest(hand_made_net(), 0.5, scope="convs")
    with pytest.raises(ValueError, match="selects no weights"):
        prune_smallest(nn.Sequential(nn.Embedding(3, 2)), 0.5)


# ----------------------------------------------------------------------------------------------- losses


def test_per_image_losses_repeat_for_a_seed_whatever_the_batch_size():
    net = PerClassLinear(3, 16)
    images, labels = random_images([5, 3, 2])
    a = per_image_losses(net, images, labels, DIFFUSION, draws=3, seed=7, batch_size=4)
    b = per_image_losses(net, images, labels, DIFFUSION, draws=3, seed=7, batch_size=30)
    c = per_image_losses(net, images, labels, DIFFUSION, draws=3, seed=8, batch_size=4)
    assert a.shape == (10, 3) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert not torch.allclose(a, c)


def test_zero_noise_prediction_has_unit_loss_per_class():
    # Loss of a pair = mean over P pixels of eps^2, eps ~ N(0, 1): mean 1, variance 2 / P. A class mean over
    # m pairs has standard error sqrt(2 / (P m)); 5 of them bound it (a false alarm once in ~1.7 million).
    counts, pixels, draws = [12, 6, 3], 16, 20
    images, labels = random_images(counts)
    result = pruning_probe(ZeroNoise(3), images, labels, 3, DIFFUSION, fraction=0.5, draws=draws, seed=0,
                           batch_size=64)
    for c, n in enumerate(counts):
        bound = 5 * math.sqrt(2 / (pixels * n * draws))
        assert abs(result["loss_raw"][c] - 1) < bound
        # Pruning a network that ignores its weights changes nothing, on identical draws: exactly 0.
        assert result["loss_pruned"][c] == result["loss_raw"][c]
        assert result["relative_change"][c] == 0 and result["relative_change_se"][c] == 0


def test_pruning_reaches_only_the_class_whose_weights_are_small():
    net = PerClassLinear(2, 16)
    with torch.no_grad():
        net.per_class[0].weight.uniform_(0.5, 1.0)
        net.per_class[1].weight.uniform_(-1e-3, 1e-3)
    images, labels = random_images([6, 6])
    result = pruning_probe(net, images, labels, 2, DIFFUSION, fraction=0.5, draws=4, seed=1, batch_size=16)
    assert result["prune"]["zeroed"] == 256
    assert torch.count_nonzero(net.per_class[1].weight) == 256       # the probe pruned a copy
    assert result["relative_change"][0] == 0.0                        # class 0's weights all survived
    assert result["relative_change"][1] != 0.0
    # Class 1 now predicts zero noise: the unit loss of the previous test, within its 5-se bound.
    assert abs(result["loss_pruned"][1] - 1) < 5 * math.sqrt(2 / (16 * 6 * 4))


def test_a_fraction_too_small_to_zero_anything_changes_no_loss():
    net = tiny_unet()
    images, labels = random_images([3, 2, 2, 1], size=8)
    considered = sum(p.numel() for _, p in prunable_weights(net))
    result = pruning_probe(net, images, labels, 4, DIFFUSION, fraction=0.4 / considered, draws=2, seed=0,
                           batch_size=32)
    assert result["prune"]["zeroed"] == 0
    assert result["relative_change"] == [0.0] * 4


def test_relative_change_standard_error_matches_the_spread_over_seeds():
    # The probe images stay fixed; only the draws change with the seed. The reported se treats the pairs as
    # i.i.d. from the class, which can only overstate that spread, so it should not fall far below it.
    torch.manual_seed(0)
    net = PerClassLinear(1, 16)
    images, labels = random_images([8])
    pruned = PerClassLinear(1, 16)
    pruned.load_state_dict(net.state_dict())
    with torch.no_grad():
        pruned.per_class[0].weight[:, :8] = 0
    changes, ses = [], []
    for seed in range(40):
        draws = dict(diffusion=DIFFUSION, draws=4, seed=seed, batch_size=64)
        result = compare_class_losses(per_image_losses(net, images, labels, **draws),
                                      per_image_losses(pruned, images, labels, **draws), labels, 1,
                                      names=("raw", "pruned"))
        changes.append(result["relative_change"][0])
        ses.append(result["relative_change_se"][0])
    spread = float(np.std(changes, ddof=1))
    assert 0.7 < float(np.mean(ses)) / spread < 3


def test_results_are_json_and_ordered_head_to_tail():
    net = PerClassLinear(3, 16)
    images, labels = random_images([2, 4, 3])
    result = pruning_probe(net, images, labels, 3, DIFFUSION, fraction=0.2, draws=2, seed=0, batch_size=8,
                           class_counts=[5, 50, 20])
    json.dumps(result, allow_nan=False)
    assert result["head_to_tail"] == [1, 2, 0] and result["num_images"] == [2, 4, 3]
    default = pruning_probe(net, images, labels, 3, DIFFUSION, fraction=0.2, draws=2, seed=0, batch_size=8)
    assert default["class_counts"] == [2, 4, 3] and default["head_to_tail"] == [1, 2, 0]


def test_a_class_without_probe_images_reports_none():
    images, labels = random_images([3, 0, 2])
    result = pruning_probe(PerClassLinear(3, 16), images, labels, 3, DIFFUSION, fraction=0.5, draws=2, seed=0,
                           batch_size=8)
    assert result["loss_raw"][1] is None and result["relative_change"][1] is None
    assert result["num_images"] == [3, 0, 2]


# ----------------------------------------------------------------------------------------------- theta_g


def test_theta_g_probe_is_exactly_zero_while_b_is_zero():
    images, labels = random_images([3, 2, 2, 1], size=8)
    result = theta_g_probe(tiny_unet(cm=True), images, labels, 4, DIFFUSION, draws=2, seed=0, batch_size=32)
    assert result["relative_change"] == [0.0] * 4
    assert result["loss_full"] == result["loss_theta_g"]
    assert result["branches"] == len(list(branches(tiny_unet(cm=True))))


def test_theta_g_probe_sees_nonzero_branches_and_leaves_them_on():
    net = tiny_unet(cm=True, random_b=True)
    images, labels = random_images([3, 2, 2, 1], size=8)
    result = theta_g_probe(net, images, labels, 4, DIFFUSION, draws=2, seed=0, batch_size=32)
    assert all(change != 0 for change in result["relative_change"])
    assert all(m.enabled for m in branches(net))


def test_theta_g_probe_needs_branches():
    images, labels = random_images([2, 2, 2, 2], size=8)
    with pytest.raises(ValueError, match="no low-rank branches"):
        theta_g_probe(tiny_unet(), images, labels, 4, DIFFUSION, draws=1, seed=0, batch_size=8)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("labels, num_classes, message", [
    ([0, 1, 2, 4], 4, "outside the model's 4 classes"),
    ([0, 1, 2, -1], 4, "start at 0"),
    ([0, 1, 2, 3], 5, "exceeds the model's 4 classes"),
    ([0, 1, 2, 2], 2, "outside the data's 2 classes"),
    ([0, 1, 2], 4, "labels must be"),
])
def test_probes_reject_labels_the_model_does_not_have(labels, num_classes, message):
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=message):
        pruning_probe(tiny_unet(), images, torch.tensor(labels), num_classes, DIFFUSION, fraction=0.5, draws=1,
                      seed=0, batch_size=4)


def test_loading_a_trained_checkpoint_gives_its_ema_weights(tmp_path):
    config = {"preset": "tiny", "num_classes": 4, "in_channels": 1, "image_size": 8, "rank_ratio": 0.25,
              "branch_scale": 1.0, "branch_layers": "decoder"}
    raw, ema = tiny_unet(cm=True, seed=0), tiny_unet(cm=True, random_b=True, seed=1)
    io.save_torch(tmp_path / "model.pt", {"format": "cm.model/1", "config": config, "method": "cm", "step": 1,
                                          "state_dict": raw.state_dict(), "ema": ema.state_dict()})
    net, state = load_trained(tmp_path / "model.pt")
    assert state["config"] == config and not net.training
    for key, value in ema.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    with pytest.raises(ValueError, match="ema, state_dict"):
        load_trained(tmp_path / "model.pt", weights="model")


def test_stored_images_become_model_inputs():
    images, labels = as_model_inputs(np.array([[[[0], [255]]]], dtype=np.uint8), np.array([3]))
    assert images.shape == (1, 1, 1, 2) and images.tolist() == [[[[-1.0, 1.0]]]]
    assert labels.dtype == torch.int64 and labels.tolist() == [3]


# ----------------------------------------------------------------------------------------------- dominance


def test_dominance_follows_the_group_with_the_larger_summed_gradient():
    # Many: classes 0, 1 with 40 images each and W2 scaled by 0.01; few: classes 2, 3 with 4 images each and
    # W2 at full scale. Without a medium group, cos(a+b, a) > cos(a+b, b) exactly when |a| > |b|: W1's
    # per-sample gradients are alike across classes, so 10x the samples win it for the majority; W2's
    # majority gradients are 100x smaller per sample, so 10x the samples lose it to the minority.
    net = SharedAndScaled(16, [0.01, 0.01, 1.0, 1.0])
    images, labels = random_images([40, 40, 4, 4])
    splits = {"many": [0, 1], "medium": [], "few": [2, 3]}
    result = gradient_dominance(net, images, labels, splits, DIFFUSION, batches=3, batch_size=44, seed=0)
    rows = {row["name"]: row for row in result["tensors"]}
    assert rows["shared.weight"]["dominated_by"] == "many"
    assert rows["scaled.weight"]["dominated_by"] == "few"
    assert rows["shared.weight"]["norm_many"] > rows["shared.weight"]["norm_few"]
    share = ("tensors", "defined", "majority_dominated", "fraction")
    assert list(result["by_block"]) == ["other"]
    assert {k: result["by_block"]["other"][k] for k in share} == {"tensors": 2, "defined": 2,
                                                                  "majority_dominated": 1, "fraction": 0.5}
    assert rows["shared.weight"]["margin"] > 0 > rows["scaled.weight"]["margin"]   # the sign is the verdict
    assert result["overall"]["fraction"] == 0.5
    assert result["samples"]["many"] + result["samples"]["few"] == 3 * 44 and result["samples"]["medium"] == 0
    json.dumps(result, allow_nan=False)


def independent_group_gradients(net, images, labels, groups, drawn, names):
    """G per group for the named parameters: a separate forward and backward pass on each group's subset."""
    params = dict(net.named_parameters())
    totals = {group: {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names} for group in groups}
    for index, t, eps in drawn:
        for group, classes in groups.items():
            rows = torch.isin(labels[index], torch.tensor(classes))
            if not rows.any():
                continue
            net.zero_grad()
            x0, t_g, eps_g = images[index][rows], t[rows], eps[rows]
            pred = net(DIFFUSION.q_sample(x0, t_g, eps_g), t_g, labels[index][rows])
            ((pred - eps_g) ** 2).mean(dim=(1, 2, 3)).sum().div(len(index)).backward()
            for name in names:
                totals[group][name] += params[name].grad.double()
    return totals


def test_dominance_cosines_match_separate_passes_on_each_group():
    net = tiny_unet(num_classes=6, cm=True, random_b=True).eval()
    images, labels = random_images([4] * 6, size=8)
    splits = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    result = gradient_dominance(net, images, labels, splits, DIFFUSION, batches=2, batch_size=12, seed=5)
    drawn = noised_probe_batches(len(images), images.shape[1:], DIFFUSION, batches=2, batch_size=12, seed=5)
    names = ["head.weight", "label_emb.weight", "middleblocks.0.conv1.weight", "upblocks.1.conv2.base.weight",
             "upblocks.1.conv2.A", "upblocks.1.conv2.B", "tail.2.weight"]
    grads = independent_group_gradients(net, images, labels, {"all": list(range(6)), **splits}, drawn, names)
    rows = {row["name"]: row for row in result["tensors"]}
    for name in names:
        g = {group: grads[group][name].flatten() for group in ("all", "many", "few")}
        cos = {group: (torch.dot(g["all"], g[group]) / (g["all"].norm() * g[group].norm())).item()
               for group in ("many", "few")}
        assert rows[name]["cos_many"] == pytest.approx(cos["many"], abs=1e-5), name
        assert rows[name]["cos_few"] == pytest.approx(cos["few"], abs=1e-5), name
        assert rows[name]["norm_all"] == pytest.approx(g["all"].norm().item(), rel=1e-4), name
    assert (rows["head.weight"]["block"], rows["middleblocks.0.conv1.weight"]["block"], rows["tail.2.weight"]["block"]
            ) == ("encoder", "middle", "decoder")
    assert rows["upblocks.1.conv2.A"]["part"] == "BA" and rows["upblocks.1.conv2.base.weight"]["part"] == "W_g"
    part_sizes = {part: entry["tensors"] for part, entry in result["by_part"].items()}
    assert part_sizes["BA"] == 2 * len(list(branches(net)))
    assert sum(entry["tensors"] for entry in result["by_block"].values()) == len(result["tensors"])


def test_a_branch_without_direction_is_left_out_of_the_fractions():
    # With B = 0 the gradient of A is exactly zero (dL/dA = s B^T ...): no direction to compare.
    net = tiny_unet(num_classes=4, cm=True)
    images, labels = random_images([3, 3, 3, 3], size=8)
    result = gradient_dominance(net, images, labels, {"many": [0], "medium": [1, 2], "few": [3]}, DIFFUSION,
                                batches=1, batch_size=12, seed=0)
    a_rows = [row for row in result["tensors"] if row["name"].endswith(".A")]
    assert a_rows and all(row["cos_many"] is None and row["dominated_by"] is None for row in a_rows)
    assert result["by_part"]["BA"]["defined"] == result["by_part"]["BA"]["tensors"] - len(a_rows)


def test_margin_has_the_closed_form_of_orthogonal_gradients_proportional_to_the_counts():
    # G_many, G_few on rows 0 and 1 of E: orthogonal, G_all = G_many + G_few, |G_many| / |G_few| = n_many / n_few
    # = rho, so margin = (rho - 1) / sqrt(rho^2 + 1) = (n_many - n_few) / sqrt(n_many^2 + n_few^2). The one
    # error is the noise's in each norm, relative 1 / (value sqrt(n P)) <= 1 / (1e3 * 4) = 2.5e-4 per standard
    # deviation (P = 16 pixels, n >= 1), and |d margin / d log rho| <= 0.71: abs 2e-3 is over 5 sigma.
    net = ClassEmbedding(2, (1, 4, 4))
    images, labels = random_images([30, 6])
    result = gradient_dominance(net, images, labels, {"many": [0], "few": [1]}, DIFFUSION, batches=4,
                                batch_size=12, seed=0)
    n_many, n_few = result["samples"]["many"], result["samples"]["few"]
    assert n_many + n_few == 4 * 12 and n_few > 0
    (row,) = result["tensors"]
    assert row["margin"] == pytest.approx((n_many - n_few) / math.hypot(n_many, n_few), abs=2e-3)
    assert row["cos_many"] == pytest.approx(n_many / math.hypot(n_many, n_few), abs=2e-3)
    assert result["overall"]["margin"] == result["by_block"]["other"]["margin"] == row["margin"]
    assert result["by_part"]["W_g"]["margin"] == row["margin"]


def test_margin_grows_with_the_imbalance_ratio_where_the_share_cannot():
    # batch_size >= the set: every batch is the whole set, so n_many / n_few is the ratio exactly.
    margins, shares = {}, {}
    for ratio in (1, 2, 10):
        images, labels = random_images([5 * ratio, 5])
        result = gradient_dominance(ClassEmbedding(2, (1, 4, 4)), images, labels, {"many": [0], "few": [1]},
                                    DIFFUSION, batches=2, batch_size=100, seed=ratio)
        assert result["samples"] == {"many": 10 * ratio, "few": 10, "medium": 0}
        margins[ratio], shares[ratio] = result["overall"]["margin"], result["overall"]["fraction"]
    assert margins[10] > margins[2] > margins[1]
    assert margins[1] == pytest.approx(0, abs=2e-3)                       # balanced: no lead (see above)
    assert margins[2] == pytest.approx(1 / math.sqrt(5), abs=2e-3)
    assert margins[10] == pytest.approx(9 / math.sqrt(101), abs=2e-3)
    assert shares[2] == shares[10] == 1.0                                 # the share saturates already at 2


def batch_margins_by_hand(net, images, labels, splits, drawn, names):
    """[batch][matrix] cos(G_all_b, G_many_b) - cos(G_all_b, G_few_b) from separate passes per group and batch;
    None where a group has no image in the batch (zero gradient, no direction)."""
    def cosine(a, b):
        norms = a.norm() * b.norm()
        return None if norms == 0 else (torch.dot(a.flatten(), b.flatten()) / norms).item()

    groups = {"all": list(range(int(labels.max()) + 1)), "many": splits["many"], "few": splits["few"]}
    margins = []
    for one in drawn:
        g = independent_group_gradients(net, images, labels, groups, [one], names)
        cos = [(cosine(g["all"][n], g["many"][n]), cosine(g["all"][n], g["few"][n])) for n in names]
        margins.append([None if None in pair else pair[0] - pair[1] for pair in cos])
    return margins


def test_margin_batch_std_is_the_spread_over_batches_of_each_batch_s_own_margin():
    # Base width 64: at 32 the first level's GroupNorm(32, 32) has one channel per group and cancels the
    # temb_proj shift exactly, so those gradients are float32 round-off (~1e-7) with irreproducible cosines.
    net = tiny_unet(num_classes=4, cm=True, random_b=True, ch=64).eval()
    images, labels = random_images([6, 3, 3, 2], size=8)     # the few class 3 is images 12 and 13
    splits = {"many": [0], "medium": [1, 2], "few": [3]}
    result = gradient_dominance(net, images, labels, splits, DIFFUSION, batches=4, batch_size=5, seed=2)
    drawn = noised_probe_batches(len(images), images.shape[1:], DIFFUSION, batches=4, batch_size=5, seed=2)
    assert [b for b, (index, _, _) in enumerate(drawn) if not (index >= 12).any()] == [2]   # no few image
    rows = result["tensors"]
    per_batch = batch_margins_by_hand(net, images, labels, splits, drawn, [row["name"] for row in rows])
    assert all(m is None for m in per_batch[2])
    groups = [(result["overall"], range(len(rows)))] + [
        (result["by_block"][block], [i for i, row in enumerate(rows) if row["block"] == block])
        for block in result["by_block"]]
    for entry, members in groups:
        means = [np.mean([m[i] for i in members if m[i] is not None]) for m in per_batch
                 if any(m[i] is not None for i in members)]
        assert entry["margin_batches"] == len(means) == 3
        assert entry["margin_batch_std"] == pytest.approx(np.std(means, ddof=1), abs=1e-5)
        assert entry["margin_batch_std"] > 0
        assert entry["margin"] == pytest.approx(np.mean([rows[i]["margin"] for i in members
                                                         if rows[i]["margin"] is not None]), abs=1e-12)
    images, labels = random_images([8, 4])
    one = gradient_dominance(ClassEmbedding(2, (1, 4, 4)), images, labels, {"many": [0], "few": [1]}, DIFFUSION,
                             batches=1, batch_size=12, seed=0)
    assert one["overall"]["margin_batches"] == 1 and one["overall"]["margin_batch_std"] is None
    json.dumps(one, allow_nan=False)


@pytest.mark.parametrize("splits, message", [
    ({"many": [0, 1], "medium": [2], "few": []}, r"splits\['few'\] is empty"),
    ({"many": [0, 1], "few": [2, 7]}, "not among the model's 4 classes"),
    ({"many": [0, 1], "few": [1, 3]}, "in both"),
])
def test_dominance_rejects_bad_splits(splits, message):
    images, labels = random_images([3, 3, 3, 3], size=8)
    with pytest.raises(ValueError, match=message):
        gradient_dominance(tiny_unet(), images, labels, splits, DIFFUSION, batches=1, batch_size=4, seed=0)


def test_dominance_needs_images_of_both_groups_in_its_batches():
    images, labels = random_images([3, 3, 3, 0], size=8)
    with pytest.raises(ValueError, match="no image of these classes"):
        gradient_dominance(tiny_unet(), images, labels, {"many": [0], "few": [3]}, DIFFUSION, batches=1,
                           batch_size=4, seed=0)
    images, labels = random_images([40, 0, 0, 1], size=8)
    drawn = noised_probe_batches(41, (1, 8, 8), DIFFUSION, batches=1, batch_size=2, seed=1)
    assert 40 not in drawn[0][0]      # the seed's one batch misses the only few image
    with pytest.raises(ValueError, match="raise batches or batch_size"):
        gradient_dominance(tiny_unet(), images, labels, {"many": [0], "few": [3]}, DIFFUSION, batches=1,
                           batch_size=2, seed=1)


def test_the_probe_stage_refuses_a_model_of_other_classes_in_one_line(tmp_path):
    """`python -m cm probe` with a 4-class model on the 10-class digits set: one line, nothing written."""
    import os
    import subprocess
    import sys

    import yaml

    from cm import config as cfg
    from cm.data import build_manifest
    from tests.conftest import ROOT

    config = {"preset": "tiny", "num_classes": 4, "in_channels": 1, "image_size": 8, "rank_ratio": 0.25,
              "branch_scale": 1.0, "branch_layers": "decoder"}
    net = tiny_unet(cm=True, seed=0)
    io.save_torch(tmp_path / "model.pt", {"format": "cm.model/1", "config": config, "method": "cm", "step": 1,
                                          "state_dict": net.state_dict(), "ema": net.state_dict()})
    params = cfg.load_yaml(ROOT / "params.yaml")
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    io.write_json(tmp_path / "manifest.json", build_manifest(cfg.load_params(tmp_path / "params.yaml")
                                                             ["experiments"]["digits_lt"]["data"]))
    result = subprocess.run([sys.executable, "-m", "cm", "probe",
                             "--experiment", "digits_lt", "--method", "cm", "--seed", "0",
                             "--model", str(tmp_path / "model.pt"), "--manifest", str(tmp_path / "manifest.json"),
                             "--out", str(tmp_path / "probe.json")],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CM_PROGRESS": "0"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"error: probe cm seed 0: {tmp_path / 'model.pt'}: the model has 4 classes, the training "
                         "set 10: not a model of this experiment")
    assert not (tmp_path / "probe.json").exists()
