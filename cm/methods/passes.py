"""How CM obtains h_full and h_g per step: the `passes` parameter of method_params.cm.

    two             (released recipe) the base objective runs the full model theta_g+e; then a second,
                    complete forward pass of theta_g (branches off) gives h_g. Independent dropout masks.
    shared_encoder  (fast mode) the reserved branches sit in the decoder only (cm/lowrank.py), so the
                    encoder and middle block compute the same function in both passes. They run once;
                    the decoder runs twice on the same encoding, branches on (h_full) then off (h_g).
                    Gradients of both decoder passes meet in the shared encoder (no stop-gradient).
                    Departure: the encoder's dropout mask is shared by h_full and h_g.

Both give L = L_base(h_full) + lambda * L_CM with the same h_full, h_g; without dropout they are the
same function of the weights (tests/test_cm_fast_mode.py).
"""

from __future__ import annotations

import torch

from cm.lowrank import branches_disabled
from cm.methods.base import LossOutput, Method, leading_part

PASSES = ("two", "shared_encoder")


def check_passes(passes: str) -> str:
    """`passes` itself, or ValueError naming the value and what is allowed."""
    if passes not in PASSES:
        raise ValueError(f"cm: passes = {passes!r} is not allowed: one of {', '.join(PASSES)}")
    return passes


def _leads_with(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether b is a itself or the leading part `cat_rows` batched into a, or both are None. Decided
    from identity alone: comparing values would wait for the device (a host sync every step)."""
    if a is None or b is None:
        return a is b
    return a is b or leading_part(a) is b


class SharedEncoder:
    """Stands in for the network inside the base objective: each call encodes once, keeps the
    encoding and decodes it with the branches as they are (on: theta_g+e). `theta_g` then decodes the
    kept encoding again with the branches off."""

    def __init__(self, net, disabled=branches_disabled):
        if not (hasattr(net, "encode") and hasattr(net, "decode")):
            raise TypeError(f"cm: passes = 'shared_encoder' needs a network with encode/decode, "
                            f"got {type(net).__name__}")
        self.net, self.disabled = net, disabled
        self.last = None  # (x, t, y, encoding) of the latest call

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.net.encode(x, t, y)
        self.last = (x, t, y, enc)
        return self.net.decode(enc)

    def theta_g(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """h_g = eps_{theta_g}(x_t, t, cond), decoding the kept encoding of those inputs."""
        with self.disabled(self.net):
            return self.net.decode(self._encoding_of(x_t, t, cond))

    def _encoding_of(self, x_t, t, cond):
        """The encoding of (x_t, t, cond): the leading rows of the latest call. A base may batch
        more inputs behind them with `cat_rows` (CBDM appends the y' copies); every U-Net layer acts per
        sample."""
        if self.last is None:
            raise RuntimeError("cm: the base objective never called the network")
        x, t_all, y, enc = self.last
        if not all(_leads_with(a, b) for a, b in ((x, x_t), (t_all, t), (y, cond))):
            raise RuntimeError("cm: passes = 'shared_encoder' needs the base objective's last network call to "
                               "lead with the (x_t, t, cond) of its LossOutput")
        return enc.rows(len(x_t))


def full_and_theta_g(base: Method, passes: str, net, x0: torch.Tensor, y: torch.Tensor,
                     disabled=branches_disabled) -> tuple[LossOutput, torch.Tensor]:
    """The base objective's output on the full model (its `pred` is h_full) and h_g on the same
    x_t, t and (possibly dropped) labels, with the passes chosen. `disabled(net)` is the context in
    which net is theta_g (the reserved capacity off)."""
    if passes == "shared_encoder":
        shared = SharedEncoder(net, disabled)
        out = base(shared, x0, y)
        return out, shared.theta_g(out.x_t, out.t, out.cond)
    out = base(net, x0, y)
    with disabled(net):  # a second complete pass, its own dropout masks, as released
        return out, net(out.x_t, out.t, out.cond)
