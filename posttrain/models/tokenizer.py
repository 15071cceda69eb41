"""Frame tokenizer: a convolutional autoencoder with a finite scalar quantisation (FSQ) bottleneck.

A 64x64 RGB frame becomes an 8x8 grid of tokens (vocabulary = prod(levels) = 1000 by
default) and back. FSQ (Mentzer et al. 2023) rounds each of a few bounded latent
channels to a fixed grid, so there is no codebook to collapse; gradients pass the
rounding with a straight-through estimator. Why 8x8 and not 16x16: a 16x16 grid
reconstructs better (~28 dB vs ~26 dB in 20 CPU minutes) but makes every transformer
update ~6x and every rollout step ~5x slower, and GRPO's budget is spent there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenizerConfig:
    """Shape of the FSQ autoencoder."""

    image_size: int = 64
    """Input frames are image_size x image_size RGB."""
    downsample: int = 8
    """Spatial reduction: the token grid is image_size // downsample per side."""
    channels: tuple[int, ...] = (16, 32, 64, 128)
    """Conv widths: a full-resolution stem, then one stride-2 stage per further entry (mirrored in
    the decoder). Narrow at high resolution: the full-size layers dominate the cost."""
    levels: tuple[int, ...] = (8, 5, 5, 5)
    """FSQ levels per latent channel; the vocabulary is their product."""
    decoder_blocks: int = 0
    """Extra residual blocks after each decoder upsampling (capacity near full resolution, where
    small objects' edges and colours are drawn)."""
    reference: bool = False
    """Decode with a reference frame (the last true frame before the decoded ones) beside the token ids: the
    reference, pooled to the token grid, enters the decoder, and a per-pixel gate at full resolution blends the
    reference into the output where it still holds. The ids, and so the dynamics, are unchanged; the decoder
    can copy the true pixels that did not change instead of redrawing them from 1000 codes. Added to a trained
    tokenizer by `method: adapt_tokenizer` with `reference: true` (`posttrain/adapt_tokenizer.py`)."""

    def __post_init__(self) -> None:
        self.channels, self.levels = tuple(self.channels), tuple(self.levels)
        if 2 ** (len(self.channels) - 1) != self.downsample:
            raise ValueError(f"downsample={self.downsample} needs len(channels) - 1 = log2(downsample) stride-2 "
                             f"stages; got {len(self.channels)} widths")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not a multiple of downsample={self.downsample}")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size


class FSQ(nn.Module):
    """Finite scalar quantisation with a straight-through estimator."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1, *levels[:-1])), 0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., D) latents -> (quantised latents scaled to [-1, 1], (...,) token ids)."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = self.levels // 2
        return rounded / half_width, self.codes_to_ids(rounded)

    def codes_to_ids(self, rounded: torch.Tensor) -> torch.Tensor:
        shifted = (rounded.detach() + self.levels // 2).round().long()
        return (shifted * self.basis).sum(-1)

    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels.long()
        half_width = self.levels // 2
        return (digits - half_width) / half_width


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(x))))


class FrameTokenizer(nn.Module):
    """Encode frames to token ids and decode ids to frames."""

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or TokenizerConfig()
        widths = config.channels
        encoder: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for previous, width in zip(widths, widths[1:]):
            encoder += [nn.GELU(), nn.Conv2d(previous, width, 4, stride=2, padding=1)]
        encoder += [_ResBlock(widths[-1]), nn.GELU(), nn.Conv2d(widths[-1], len(config.levels), 1)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv2d(len(config.levels), widths[-1], 3, padding=1), _ResBlock(widths[-1])]
        for previous, width in zip(widths[::-1], widths[::-1][1:]):
            decoder += [nn.GELU(), nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1)]
            decoder += [_ResBlock(width) for _ in range(config.decoder_blocks)]
        decoder += [nn.GELU(), nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)
        self.fsq = FSQ(config.levels)
        if config.reference:
            self.reference_in = nn.Conv2d(3, widths[-1], 3, padding=1)
            self.reference_gate = nn.Sequential(nn.Conv2d(widths[0] + 13, 16, 3, padding=1), nn.GELU(),
                                                nn.Conv2d(16, 1, 1))
            self.reset_reference()

    def reset_reference(self) -> None:
        """Start the reference path neutral: nothing enters the decoder, and the gate is half open everywhere
        (output = the mean of the drawn frame and the reference). A closed start (a very negative bias) would
        keep the base's output but open at the optimizer's pace, ~lr per step: hundreds of steps per unit."""
        for conv in (self.reference_in, self.reference_gate[-1]):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def decoding_modules(self) -> list[nn.Module]:
        """The modules that turn ids into pixels (what decoder adaptation trains)."""
        extra = [self.reference_in, self.reference_gate] if self.config.reference else []
        return [self.decoder, *extra]

    def _decode_latents(self, latents: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor] | None
                        ) -> torch.Tensor:
        """(M, D, g, g) latents [+ ((M, H, W, 3) reference frames, (M,) their distances in frames)] -> (M, 3, H, W)
        output in about [-1, 1]."""
        if not self.config.reference or reference is None:
            return self.decoder(latents)
        reference, gap = reference
        ref = self.to_input(reference).to(latents.dtype)  # (M, 3, H, W) in [-1, 1]
        hidden = self.decoder[1](self.decoder[0](latents) + self.reference_in(F.adaptive_avg_pool2d(
            ref, latents.shape[-2:])))
        for layer in self.decoder[2:-1]:
            hidden = layer(hidden)
        drawn = self.decoder[-1](hidden)
        # The gate sees the decoder's features, the reference, what the decoder drew, and how far the two differ
        # averaged over one token's patch and over 2x2 patches: the drawn frame is blurry, so pixels disagree
        # everywhere, but its patch means are right. Where they match the reference's, the reference still
        # holds, and its true pixels are sharper than any of 1000 codes. (A hidden layer: "open where the
        # difference is small" is not monotonic in a signed difference.)
        size = drawn.shape[-2:]
        apart = [F.interpolate(F.avg_pool2d(ref - drawn, k), size=size, mode="nearest").abs()
                 for k in (self.config.downsample, 2 * self.config.downsample)]
        # And how old the reference is (1 / frames): one frame back it holds almost everywhere, eight back rarely.
        age = (1.0 / gap.to(drawn.dtype))[:, None, None, None].expand(-1, 1, *size)
        gate = torch.sigmoid(self.reference_gate(torch.cat([hidden, ref, drawn, *apart, age], 1)))
        return gate * ref + (1 - gate) * drawn

    def _references(self, reference: torch.Tensor | None, lead: torch.Size, gap: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One (reference frame, distance in frames) per decoded frame, flattened. `reference` has the ids'
        leading shape (each the frame just before its own: distance 1, unless `gap` says otherwise), or one
        fewer dimension: one frame per sequence, the last true frame before it, so the t-th frame along the
        last leading dimension (time) is t + 1 frames after it."""
        if reference is None or not self.config.reference:
            return None
        if reference.shape[:-3] == lead[:-1] and len(lead) >= 1:
            reference = reference.unsqueeze(len(lead) - 1).expand(*lead, *reference.shape[-3:])
            steps = torch.arange(1, lead[-1] + 1, device=reference.device)
            gap = steps.view(*([1] * (len(lead) - 1)), -1).expand(*lead) if gap is None else gap
        if reference.shape[:-3] != lead:
            raise ValueError(f"reference frames {tuple(reference.shape)} do not match ids with leading shape "
                             f"{tuple(lead)} (give one per frame, or one per sequence)")
        gap = torch.ones(lead, device=reference.device) if gap is None else torch.as_tensor(gap).expand(*lead)
        return reference.reshape(-1, *reference.shape[-3:]), gap.reshape(-1)

    @staticmethod
    def to_input(frames: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 or float in [0, 1] -> (N, 3, H, W) float in [-1, 1]."""
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255.0
        return frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2) * 2 - 1

    def forward(self, frames: torch.Tensor, reference: torch.Tensor | None = None, gap: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct frames (..., H, W, 3): returns (reconstruction in [0, 1], token ids (..., N)).
        `reference`: frames to decode with, `gap` how many frames before each it is (`TokenizerConfig.reference`;
        ignored otherwise; see `decode`)."""
        lead = frames.shape[:-3]
        # Quantise in float32 even under bf16 autocast: bf16 would move values across rounding edges.
        latents, ids = self.fsq(self.encoder(self.to_input(frames)).float().permute(0, 2, 3, 1))
        recon = self._decode_latents(latents.permute(0, 3, 1, 2), self._references(reference, lead, gap)).float()
        recon = ((recon.permute(0, 2, 3, 1) + 1) / 2).reshape(*lead, *recon.shape[-2:], 3)
        return recon, ids.reshape(*lead, -1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) frames -> (..., N) int64 token ids (row-major grid)."""
        lead = frames.shape[:-3]
        _, ids = self.fsq(self.encoder(self.to_input(frames)).float().permute(0, 2, 3, 1))
        return ids.reshape(*lead, -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, reference: torch.Tensor | None = None, gap: torch.Tensor | int | None = None
               ) -> torch.Tensor:
        """(..., N) token ids -> (..., H, W, 3) float frames in [0, 1]. `reference` (see `TokenizerConfig.reference`;
        ignored without it): one frame per sequence, the last true frame before the sequence's first (so frame t
        is t + 1 frames after it), or one per frame, the frame just before it; `gap` overrides those distances
        (frames between each reference and its decoded frame, e.g. a live rollout's k-th frame: k)."""
        return self.draw(ids, reference, gap).clamp(0, 1)

    def draw(self, ids: torch.Tensor, reference: torch.Tensor | None = None, gap: torch.Tensor | None = None
             ) -> torch.Tensor:
        """`decode` with gradients to the decoding modules and without the final clamp (decoder training on
        ids that no true frame has, e.g. a model's own rollouts); `gap`: each reference's distance in frames."""
        lead, grid = ids.shape[:-1], self.config.grid
        latents = self.fsq.ids_to_latents(ids.reshape(-1, grid, grid)).permute(0, 3, 1, 2)
        out = self._decode_latents(latents, self._references(reference, lead, gap)).float()
        frames = ((out + 1) / 2).permute(0, 2, 3, 1)
        return frames.reshape(*lead, *frames.shape[-3:])


