"""Temporal Noise Fusion (TNF): merge residual noise (UNet) and reference noise (image prior).

eps_hat^i = phi(delta^i, eps_ref^i, t). The paper gives the shape of phi — adaptive
LayerNorm on residual-noise features modulated by t, self-attention, cross-attention with
[eps_ref, delta] as key/value, a projection back to noise space — and leaves the rest open.
Our choices, each a `FusionConfig` field:

- Tokens are p x p latent patches (`patch_size`) of every frame, with learned frame and
  spatial position embeddings. Attention spans the whole clip rather than one frame: how
  much to trust the reference noise depends on the distance from the first frame (the
  linear ablation hard-codes exactly that), so the block must know the frame index, and
  comparing a frame with its neighbours is cheap (F*(h/p)*(w/p) tokens: 1,024 at paper
  scale with p=2).
- Non-square and other sizes: the spatial embedding is one table for the configured token
  grid (h/p) x (w/p) (`latent_size`: an int, or [h, w]), row-major, the same parameter
  name and shape as before for an int; a model fed latents of another size resamples that
  table to the new grid (bicubic, antialiased when shrinking, as ViT/DiT position
  embeddings are resized), so one model serves several sizes and aspect ratios and an
  existing checkpoint loads and samples exactly as before at its own size. We chose this
  over factorised row + column embeddings because those would rename or reshape the
  parameters of every existing checkpoint. Frames: up to `num_frames`, the first rows of
  the frame table.
- Key/value are the reference tokens and the residual tokens side by side on the sequence
  axis, each with a learned type embedding and LayerNorm'd: the reference noise is
  unbounded for small t (it divides by sqrt(1 - abar_t)), so it must be normalised before
  it is mixed.
- Each block is adaLN-Zero style (DiT): the timestep embedding produces shift, scale and
  a gate per sub-layer, gates initialised to zero.
- The output is a gated mix plus a correction, both read off the tokens:
      eps_hat = lam * eps_ref + (1 - lam) * delta + corr,
      lam = sigmoid(b_f + w_f . emb(t) + g(tokens))
  The per-frame, per-timestep part (b_f, w_f) starts as the linear schedule of the TRIP^W
  ablation (`linear_start` -> `linear_end`), and g and corr are zero-initialised, so an
  untrained TNF *is* the linear fusion and training only refines it. We tried the
  alternative "delta + zero-initialised projection" (TNF starts as TRIP^-): it has to learn
  to route the reference noise through attention from nothing, and on the CPU demo it had
  not learned to use the prior at all after 400 steps (loss 0.58 vs 0.30 for the gated
  form). The timestep term matters: for small t the reference noise of later frames is
  large where the video moves (it divides by sqrt(1 - abar_t)), so the gate must close there.

Also `LinearFusion` (TRIP^W ablation: lambda falling linearly over frames) and `NoFusion`
(TRIP^-: the UNet predicts the noise directly).

Each of the three is a diffusers `ModelMixin` + `ConfigMixin` with a flat, JSON-serialisable
constructor: an exported model keeps its fusion in a `fusion/` folder (config.json + weights)
that `TRIPPipeline` loads like any diffusers model. Every one records the clip shape it was
built for (`latent_channels`, `num_frames`, `latent_size`), so a model's shape can be read
back from its `unet/` and `fusion/` configs alone. These config keys are serialised: they
are forever.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ModelMixin is named here because diffusers' pipeline loader looks it up in this module
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from trip.config import FusionConfig, Size, normalise_size, size_hw
from trip.model.config_only import ConfigOnlyModel


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: [B] -> [B, dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Attention(nn.Module):
    """Multi-head attention on PyTorch SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TNFBlock(nn.Module):
    """adaLN -> self-attention -> adaLN -> cross-attention([ref, residual]) -> adaLN -> MLP."""

    def __init__(self, dim: int, heads: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.cross_attn = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 9 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mods = self.modulation(cond)[:, None].chunk(9, dim=-1)
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3) = mods
        h = self.norm1(x) * (1 + sc1) + sh1
        x = x + g1 * self.self_attn(h, h)
        h = self.norm2(x) * (1 + sc2) + sh2
        x = x + g2 * self.cross_attn(h, kv)
        h = self.norm3(x) * (1 + sc3) + sh3
        return x + g3 * self.mlp(h)


class TemporalNoiseFusion(ModelMixin, ConfigMixin):
    """TNF over [B, C, F, H, W] noise tensors."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, *, latent_channels: int, num_frames: int, latent_size: int | list[int], patch_size: int = 2,
                 dim: int = 64, depth: int = 1, heads: int = 4, timestep_dim: int = 64,
                 linear_start: float = 1.0, linear_end: float = 0.0) -> None:
        super().__init__()
        cfg = FusionConfig(mode="tnf", patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                           timestep_dim=timestep_dim, linear_start=linear_start, linear_end=linear_end)
        p = cfg.patch_size
        h, w = size_hw(latent_size)
        if h % p or w % p:
            raise ValueError(f"latent_size {latent_size} must be divisible by fusion.patch_size {p}")
        self.cfg = cfg
        self.channels = latent_channels
        self.num_frames = num_frames
        self.grid = (h // p, w // p)  # the token grid the spatial embedding is stored for
        patch_dim = latent_channels * p * p
        self.embed_residual = nn.Linear(patch_dim, cfg.dim)
        self.embed_kv = nn.Linear(patch_dim, cfg.dim)
        self.kv_norm = nn.LayerNorm(cfg.dim)
        self.type_embed = nn.Parameter(torch.zeros(2, cfg.dim))  # 0: reference, 1: residual
        self.frame_embed = nn.Parameter(torch.zeros(num_frames, cfg.dim))
        self.space_embed = nn.Parameter(torch.zeros(self.grid[0] * self.grid[1], cfg.dim))  # row-major grid
        for p_ in (self.type_embed, self.frame_embed, self.space_embed):
            nn.init.normal_(p_, std=0.02)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.timestep_dim, cfg.timestep_dim), nn.SiLU(), nn.Linear(cfg.timestep_dim, cfg.timestep_dim)
        )
        self.blocks = nn.ModuleList(TNFBlock(cfg.dim, cfg.heads, cfg.timestep_dim) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        # per token: gate logits and correction for each of its patch_dim noise values
        self.proj_out = nn.Linear(cfg.dim, 2 * patch_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # base gate per frame and timestep, starting as the linear schedule of TRIP^W
        self.gate_time = nn.Linear(cfg.timestep_dim, num_frames)
        nn.init.zeros_(self.gate_time.weight)
        lam = torch.linspace(cfg.linear_start, cfg.linear_end, num_frames).clamp(0.01, 0.99)
        with torch.no_grad():
            self.gate_time.bias.copy_(torch.log(lam / (1 - lam)))

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, F*gh*gw, C*p*p]."""
        b, c, f, h, w = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def _unpatchify(self, x: torch.Tensor, f: int, grid: tuple[int, int]) -> torch.Tensor:
        """[B, F*gh*gw, C*p*p] -> [B, C, F, gh*p, gw*p]."""
        b = x.shape[0]
        (gh, gw), p, c = grid, self.cfg.patch_size, self.channels
        x = x.reshape(b, f, gh, gw, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, gh * p, gw * p)

    def space_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Spatial position embedding of a gh x gw token grid: [gh*gw, dim].

        The stored grid's own embedding as it is; any other grid gets it resampled (bicubic,
        antialiased when shrinking, as ViT/DiT position embeddings are resized), so one model
        serves every latent size the UNet and the patch size allow."""
        if tuple(grid) == self.grid:
            return self.space_embed
        table = self.space_embed.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)  # [1, dim, gh, gw]
        table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False,
                              antialias=grid[0] < self.grid[0] or grid[1] < self.grid[1])
        return table[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1).to(self.space_embed.dtype)

    def _positions(self, f: int, grid: tuple[int, int]) -> torch.Tensor:
        return (self.frame_embed[:f, None] + self.space_embedding(grid)[None]).reshape(1, -1, self.cfg.dim)

    def forward(self, residual: torch.Tensor, reference: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Fused noise [B, C, F, H, W] from residual and reference noise of the same shape; F up
        to `num_frames`, H and W any multiples of the patch size."""
        f, h, w = residual.shape[2:]
        p = self.cfg.patch_size
        if f > self.num_frames:
            raise ValueError(f"TNF was built for at most {self.num_frames} frames, got {f}")
        if h % p or w % p:
            raise ValueError(f"TNF: latents of {h}x{w} are not divisible by its patch size {p}")
        grid = (h // p, w // p)
        dtype = self.embed_residual.weight.dtype
        pos = self._positions(f, grid)
        res_tok = self._patchify(residual.to(dtype))
        ref_tok = self._patchify(reference.to(dtype))
        x = self.embed_residual(res_tok) + pos
        kv = torch.cat([
            self.embed_kv(ref_tok) + self.type_embed[0] + pos,
            self.embed_kv(res_tok) + self.type_embed[1] + pos,
        ], dim=1)
        kv = self.kv_norm(kv)
        cond = self.time_mlp(timestep_embedding(timesteps, self.cfg.timestep_dim).to(dtype))
        for block in self.blocks:
            x = block(x, kv, cond)
        gate_tok, corr_tok = self.proj_out(self.norm_out(x)).chunk(2, dim=-1)
        base = self.gate_time(cond)[:, None, :f, None, None]  # [B, 1, F, 1, 1]
        lam = torch.sigmoid(base + self._unpatchify(gate_tok, f, grid)).float()
        corr = self._unpatchify(corr_tok, f, grid).float()
        fused = lam * reference.float() + (1 - lam) * residual.float() + corr
        return fused.to(residual.dtype)


class LinearFusion(ConfigOnlyModel):
    """TRIP^W: eps_hat^i = lambda^i eps_ref^i + (1 - lambda^i) delta^i, lambda linear in i."""

    @register_to_config
    def __init__(self, *, latent_channels: int, num_frames: int, latent_size: int | list[int],
                 linear_start: float = 1.0, linear_end: float = 0.0) -> None:
        super().__init__()
        self.start, self.end = linear_start, linear_end

    def forward(self, residual: torch.Tensor, reference: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        f = residual.shape[2]
        lam = torch.linspace(self.start, self.end, f, device=residual.device, dtype=torch.float32)
        lam = lam.view(1, 1, f, 1, 1)
        return (lam * reference.float() + (1 - lam) * residual.float()).to(residual.dtype)


class NoFusion(ConfigOnlyModel):
    """TRIP^-: no shortcut path, the UNet output is the noise prediction."""

    @register_to_config
    def __init__(self, *, latent_channels: int, num_frames: int, latent_size: int | list[int]) -> None:
        super().__init__()

    def forward(self, residual: torch.Tensor, reference: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return residual


FUSION_CLASSES: dict[str, type[nn.Module]] = {"tnf": TemporalNoiseFusion, "linear": LinearFusion, "none": NoFusion}


def fusion_kwargs(cfg: FusionConfig, channels: int, num_frames: int, latent_size: Size) -> dict:
    """FusionConfig + clip shape -> the constructor arguments (= the saved config) of its class.
    `latent_size` is saved as it is configured: an int (square, as before) or [h, w]."""
    latent_size = list(latent_size) if isinstance(latent_size, tuple) else latent_size
    shape = {"latent_channels": channels, "num_frames": num_frames, "latent_size": latent_size}
    if cfg.mode == "tnf":
        return {**shape, "patch_size": cfg.patch_size, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads,
                "timestep_dim": cfg.timestep_dim, "linear_start": cfg.linear_start, "linear_end": cfg.linear_end}
    if cfg.mode == "linear":
        return {**shape, "linear_start": cfg.linear_start, "linear_end": cfg.linear_end}
    return shape


def build_fusion(cfg: FusionConfig, channels: int, num_frames: int, latent_size: Size) -> nn.Module:
    return FUSION_CLASSES[cfg.mode](**fusion_kwargs(cfg, channels, num_frames, latent_size))


def fusion_config_from_saved(config: dict, source: str) -> tuple[FusionConfig, int, int, Size]:
    """A saved fusion config.json -> (FusionConfig, latent_channels, num_frames, latent_size)."""
    modes = {cls.__name__: mode for mode, cls in FUSION_CLASSES.items()}
    mode = modes.get(config.get("_class_name", ""))
    if mode is None:
        raise ValueError(f"{source}: _class_name {config.get('_class_name')!r} is not a TRIP fusion "
                         f"(one of {sorted(modes)})")
    try:
        shape = (int(config["latent_channels"]), int(config["num_frames"]),
                 normalise_size(config["latent_size"], f"{source}: latent_size"))
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from e
    fields = {k: config[k] for k in ("patch_size", "dim", "depth", "heads", "timestep_dim", "linear_start",
                                     "linear_end") if k in config}
    return FusionConfig(mode=mode, **fields), *shape
