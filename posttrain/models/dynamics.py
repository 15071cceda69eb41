"""Action-conditioned dynamics transformer over frame-token blocks, with a sliding-window KV cache.

The sequence is frames of N tokens each. Frame t's tokens carry the action a_t that
takes frame t to t+1; the outputs at frame t predict all N tokens of frame t+1 in
parallel (independent given the context). With `patch` = p > 1, each transformer
position holds a p x p block of the token grid (p*p embeddings summed in, p*p output
heads): a 16x16 token grid costs the transformer what an 8x8 one does, while the
tokenizer keeps 4-pixel patches that hold small objects. Attention is block-causal over a sliding
window: a token of frame t sees every token of frames t-W+1 .. t (W = context_frames),
its own frame included. Time enters through rotary embeddings of the frame index, so
keys cached at absolute positions stay valid as the window slides. Space enters through a
learned per-cell embedding (`positions="learned"`, the default and every shipped model's) or
through rotary embeddings of the cell's row and column (`"rotary"`; `"rotary+learned"` keeps
both): then attention scores depend on offsets between cells, not on where they are, so one
camera shift is one pattern to learn rather than one per cell. `forward` (full sequence, masked) and `step`
(one new frame against the cache) compute the same function: cached rollouts and
`score()` agree to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POSITIONS = ("learned", "rotary", "rotary+learned")


@dataclass
class DynamicsConfig:
    """Shape of the dynamics transformer."""

    vocab_size: int = 1000
    """Token vocabulary (the tokenizer's)."""
    tokens_per_frame: int = 64
    """Tokens per frame (the tokenizer's grid, row-major)."""
    num_actions: int = 35
    """Discrete actions; id num_actions is the null action (footage without labels)."""
    width: int = 128
    """Model width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads (width must divide by heads; head dim must be even for rotary)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to `width`."""
    context_frames: int = 8
    """Attention window W in frames (the frame itself included)."""
    patch: int = 1
    """Token-grid blocks per transformer position (patch x patch tokens share one position)."""
    positions: str = "learned"
    """How attention sees space: "learned" (a learned embedding per cell, added to the input), "rotary"
    (rotary embeddings of the cell's row and column beside the frame's: scores depend on offsets only) or
    "rotary+learned" (both). Rotary splits each head's rotation pairs: a third each to rows and columns,
    the rest to time."""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: expected one of {', '.join(POSITIONS)}")
        if self.positions != "learned" and self.width // max(self.heads, 1) < 6:
            raise ValueError(f"positions={self.positions!r} needs a head dim of at least 6 (rows, columns and time "
                             f"each get rotation pairs); width={self.width} / heads={self.heads} is too small")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width={self.width} must split into {self.heads} heads of even size")
        grid = math.isqrt(self.tokens_per_frame)
        if self.patch < 1 or grid * grid != self.tokens_per_frame or grid % self.patch:
            raise ValueError(f"patch={self.patch} must divide the side of the square token grid "
                             f"({self.tokens_per_frame} tokens)")

    @property
    def grid(self) -> int:
        """Side of the square token grid."""
        return math.isqrt(self.tokens_per_frame)

    @property
    def positions_per_frame(self) -> int:
        """Transformer positions per frame: tokens_per_frame / patch**2."""
        return self.tokens_per_frame // (self.patch * self.patch)

    @property
    def null_action(self) -> int:
        return self.num_actions


def rotary(frame_index: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim/2) for rotary embeddings of the given frame indices (L,)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=frame_index.device).float() / head_dim))
    angles = frame_index.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


# Rows and columns span only grid/patch cells (8 in the default model): base 100 spreads the spatial
# frequencies over that range (offset 7 turns the slowest pair by ~0.2 rad), where 10000 would leave most pairs
# nearly still.
SPATIAL_ROTARY_BASE = 100.0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, Dh); cos/sin: (L, Dh/2)."""
    first, second = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.width // config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.o_proj = nn.Linear(config.width, config.width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, mask=None, past=None):
        """x: (B, L, D). With `past` (k, v) of earlier frames, attends to them too (no mask needed:
        the cache only ever holds frames inside the window). Returns (output, (k, v) of x)."""
        q = apply_rotary(self._split(self.q_proj(x)), cos, sin)
        k = apply_rotary(self._split(self.k_proj(x)), cos, sin)
        v = self._split(self.v_proj(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.o_proj(out), (k, v)


class Block(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.fc1 = nn.Linear(config.width, hidden)
        self.fc2 = nn.Linear(hidden, config.width)

    def forward(self, x, cos, sin, mask=None, past=None):
        attended, kv = self.attn(self.norm1(x), cos, sin, mask, past)
        x = x + attended
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))), kv


class DynamicsTransformer(nn.Module):
    """Predicts the next frame's tokens from past frames' tokens and actions."""

    def __init__(self, config: DynamicsConfig | None = None):
        super().__init__()
        self.config = config = config or DynamicsConfig()
        sub = config.patch * config.patch
        # One table per sub-position of a patch (offset ids), summed: a shared table would lose which is which.
        self.token_embed = nn.Embedding(config.vocab_size * sub, config.width)
        self.action_embed = nn.Embedding(config.num_actions + 1, config.width)
        if config.positions != "rotary":
            self.spatial_embed = nn.Parameter(torch.randn(config.positions_per_frame, config.width) * 0.02)
        else:
            self.spatial_embed = None
        side = config.grid // config.patch
        cell = torch.arange(config.positions_per_frame)
        self.register_buffer("cell_row", cell // side, persistent=False)
        self.register_buffer("cell_col", cell % side, persistent=False)
        self.register_buffer("sub_offset", torch.arange(sub) * config.vocab_size, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size * sub)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def patchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., N) row-major token grid -> (..., P, p*p): the tokens of each position."""
        p, g = self.config.patch, self.config.grid
        lead = tokens.shape[:-1]
        blocks = tokens.reshape(*lead, g // p, p, g // p, p).transpose(-3, -2)
        return blocks.reshape(*lead, (g // p) ** 2, p * p)

    def unpatchify(self, values: torch.Tensor) -> torch.Tensor:
        """(..., P, p*p, V) per-position values -> (..., N, V) in row-major token order."""
        p, g = self.config.patch, self.config.grid
        lead, last = values.shape[:-3], values.shape[-1]
        blocks = values.reshape(*lead, g // p, g // p, p, p, last).transpose(-4, -3)
        return blocks.reshape(*lead, g * g, last)

    def _embed(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, N), actions (B, T) -> (B, T*P, D)."""
        grouped = self.patchify(tokens) + self.sub_offset  # (B, T, P, p*p)
        x = self.token_embed(grouped).sum(-2)
        if self.spatial_embed is not None:
            x = x + self.spatial_embed  # before the action, as it always was: shipped models stay bitwise the same
        return (x + self.action_embed(actions)[:, :, None, :]).flatten(1, 2)

    def rotary_tables(self, frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T*P, head_dim/2) for frames `frame_index` (T,), every position of each frame in order."""
        n, head_dim = self.config.positions_per_frame, self.config.width // self.config.heads
        time = frame_index.repeat_interleave(n)
        if self.config.positions == "learned":
            return rotary(time, head_dim)
        pairs = head_dim // 2
        spatial = pairs // 3  # rotation pairs for rows, and as many for columns; time keeps the rest
        frames = frame_index.shape[0]
        parts = [rotary(time, 2 * (pairs - 2 * spatial)),
                 rotary(self.cell_row.repeat(frames), 2 * spatial, SPATIAL_ROTARY_BASE),
                 rotary(self.cell_col.repeat(frames), 2 * spatial, SPATIAL_ROTARY_BASE)]
        return torch.cat([cos for cos, _ in parts], -1), torch.cat([sin for _, sin in parts], -1)

    def window_mask(self, frames: int, first_frame: int = 0, device=None) -> torch.Tensor:
        """(T*N, T*N) bool mask: True where a query token may attend a key token."""
        frame = torch.arange(first_frame, first_frame + frames, device=device)
        allowed = (frame[None, :] <= frame[:, None]) & (frame[None, :] > frame[:, None] - self.config.context_frames)
        n = self.config.positions_per_frame
        return allowed.repeat_interleave(n, 0).repeat_interleave(n, 1)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, first_frame: int = 0,
                return_cache: bool = False):
        """Hidden states (B, T, P, D) for frames `first_frame ..`; output at frame t predicts frame t+1.

        tokens: (B, T, N) int64; actions: (B, T) int64, the action taken after each frame.
        With `return_cache`, also returns the per-layer (k, v) of the last W-1 frames, ready for `step`.
        """
        batch, frames = tokens.shape[:2]
        n = self.config.positions_per_frame
        cos, sin = self.rotary_tables(torch.arange(first_frame, first_frame + frames, device=tokens.device))
        mask = self.window_mask(frames, first_frame, tokens.device)
        x = self._embed(tokens, actions)
        cache = []
        keep = (self.config.context_frames - 1) * n
        for block in self.blocks:
            x, (k, v) = block(x, cos, sin, mask)
            if return_cache:
                cache.append((k[:, :, -keep:] if keep else k[:, :, :0], v[:, :, -keep:] if keep else v[:, :, :0]))
        hidden = self.norm(x).view(batch, frames, n, -1)
        return (hidden, cache) if return_cache else hidden

    def step(self, tokens: torch.Tensor, actions: torch.Tensor, frame_index: int, cache: list):
        """One new frame (B, N) with its action (B,) against the cache; returns hidden (B, P, D) and the
        updated cache, trimmed so the next frame again sees exactly the last W-1 frames."""
        n = self.config.positions_per_frame
        cos, sin = self.rotary_tables(torch.tensor([frame_index], device=tokens.device))
        x = self._embed(tokens[:, None], actions[:, None])
        keep = (self.config.context_frames - 1) * n
        new_cache = []
        for block, past in zip(self.blocks, cache):
            x, (k, v) = block(x, cos, sin, None, past)
            k_all, v_all = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            start = max(0, k_all.shape[2] - keep)  # never a negative index: that would cut the cache short
            new_cache.append((k_all[:, :, start:], v_all[:, :, start:]))
        return self.norm(x), new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden (..., P, D) -> logits (..., N, V) in row-major token order."""
        logits = self.head(hidden)
        if self.config.patch == 1:
            return logits
        sub = self.config.patch * self.config.patch
        return self.unpatchify(logits.unflatten(-1, (sub, self.config.vocab_size)))
