"""The Gaussian diffusion process of DDPM (Ho et al. 2020; docs/methods.md): schedule, forward noising, samplers."""

from __future__ import annotations

import torch

from cm.models.unet import NULL_LABEL


class GaussianDiffusion:
    """Linear beta schedule (DDPM's), or `scaled_linear` (Stable Diffusion's: linear in sqrt(beta), as
    diffusers' schedulers define it); the network predicts the noise eps."""

    SCHEDULES = ("linear", "scaled_linear")

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule: str = "linear"):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"diffusion schedule {schedule!r} is not allowed: one of {', '.join(self.SCHEDULES)}")
        self.timesteps = timesteps
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        self.alphas_bar = torch.cumprod(1.0 - betas, dim=0)  # abar_t, float64 for accuracy
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def alphas_bar_on(self, device: torch.device | str) -> torch.Tensor:
        """abar on `device`, copied there once (a copy per step would wait for the device)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.alphas_bar.to(device)
        return self._on_device[device]

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to the shape of `like` (N, C, H, W)."""
        return self.alphas_bar_on(like.device)[t].to(like.dtype).view(-1, 1, 1, 1)

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """t uniform on {0, ..., T-1}."""
        return torch.randint(0, self.timesteps, (n,), device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps

    @staticmethod
    def guided_eps(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance, eps = eps_c + w (eps_c - eps_u), both halves in one forward pass."""
        if guidance == 0:
            return net(x, t, y)
        eps_c, eps_u = net(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_LABEL)])
        ).chunk(2)
        return eps_c + guidance * (eps_c - eps_u)

    @torch.no_grad()
    def ddim_sample(self, net, y: torch.Tensor, shape: tuple[int, ...], *, steps: int = 50,
                    guidance: float = 1.5, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) over `steps` uniformly spaced timesteps; returns x0 in [-1, 1]."""
        device = y.device
        x = torch.randn(shape, generator=generator, device=device)
        stride = max(1, self.timesteps // steps)
        seq = list(range(0, self.timesteps, stride))[:steps]
        abar = self.alphas_bar_on(device)
        for i in reversed(range(len(seq))):
            t = torch.full((shape[0],), seq[i], device=device, dtype=torch.long)
            eps = self.guided_eps(net, x, t, y, guidance)
            a_t = abar[seq[i]].float()
            a_prev = abar[seq[i - 1]].float() if i > 0 else torch.ones((), device=device)
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # keep eps consistent with the clipped x0
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1, 1)

    @torch.no_grad()
    def ddpm_sample(self, net, y: torch.Tensor, shape: tuple[int, ...], *, guidance: float = 1.5,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling over all T steps (posterior variance beta_tilde)."""
        device = y.device
        abar = self.alphas_bar_on(device)
        x = torch.randn(shape, generator=generator, device=device)
        for step in reversed(range(self.timesteps)):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = self.guided_eps(net, x, t, y, guidance)
            a_t = abar[step]
            a_prev = abar[step - 1] if step > 0 else torch.ones((), dtype=abar.dtype, device=device)
            beta_t = 1 - a_t / a_prev
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            # Posterior mean of q(x_{t-1} | x_t, x0) (DDPM eq. 7).
            mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)) * x
            x = mean.float()
            if step > 0:
                var = beta_t * (1 - a_prev) / (1 - a_t)
                x = x + var.sqrt().float() * torch.randn(shape, generator=generator, device=device)
        return x.clamp(-1, 1)

    def sample(self, net, y: torch.Tensor, shape: tuple[int, ...], *, sampler: str, steps: int,
               guidance: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Dispatch to the named sampler."""
        if sampler == "ddim":
            return self.ddim_sample(net, y, shape, steps=steps, guidance=guidance, generator=generator)
        if sampler == "ddpm":
            return self.ddpm_sample(net, y, shape, guidance=guidance, generator=generator)
        raise ValueError(f"sampler = {sampler!r} is not allowed: one of ddim, ddpm")
