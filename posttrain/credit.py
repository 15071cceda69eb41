"""Dense verifiable credit: each token's advantage from the simulator's per-pixel truth (GRPO `credit: dense`).

Plain GRPO gives every token of a frame the frame's advantage, so one token's effect on its own patch is
drowned by the other N - 1 patches' rewards. Here a reward's per-pixel map (`RewardResult.dense`) is pooled
onto the token grid and each token also gets the group-normalised return of its own patch:

    advantage[b, t, i] = frame_weight * A_frame[b, t]  +  patch_weight * (R[b, t, i] - mean_g R[., t, i]) / s

with A_frame GRPO's frame-level return-to-go advantage (`grpo.frame_advantages`), R the patch return (below)
and s the standard deviation of the centred patch returns over the whole batch (every rank's: gradients of
N processes equal one process's). One scale for all cells, not each cell's own group std: with G = 4
samples, cells where the samples agree (floor) have a std near 0 and would get the largest advantages.

How a patch's return includes later frames (`patch_return`):
* ``none``: R[t, i] = r[t, i], the patch's own reward at its frame;
* ``same_cell``: R[t, i] = sum over t' >= t of r[t', i] (a static camera's correspondence);
* ``flow``: R[t, i] = r[t, i] + R[t + 1, m_t(i)], where m_t(i) is the cell that the scene point at cell i's
  centre moves to in the next frame, from the simulator's true depth and camera poses (the best
  correspondence a simulator gives); points that leave the view or become occluded end the chain.

What is unbiased and what is not. The token model samples a frame's tokens independently given the
context, so a frame's log-prob is a sum of per-token terms and the policy gradient for token i needs only
the rewards that token i changes. Within its frame the decoder is local, so that is (mostly) its own cell:
dropping the other cells' rewards from its advantage removes zero-mean noise, not signal, up to the
decoder's receptive field spilling a few pixels into the neighbouring cells (approximate; it is a conv
decoder). Later frames are another matter: a token is context for every later token, so its true effect on
the future is spread over the whole frame; ``none`` ignores it (myopic, biased), ``same_cell`` and ``flow``
assume it stays with the content it drew (biased, with less variance). Pushed objects move in ways depth
and camera poses do not say; ``flow`` follows the static scene only. The frame term keeps the unbiased
whole-frame return-to-go at `frame_weight`. For `HFWorldModel`, which samples a frame's tokens in
sequence, token i is also context for the later tokens of its own frame: the per-cell credit drops that
within-frame effect too (an approximation; the frame term still carries it).

Which pixels a token governs is the model's to say: `token_grid` (rows, cols) means the frame's N = rows x
cols tokens tile it row-major in equal cells, token i owning cell (i // cols, i % cols). A model without
`token_grid` is refused for dense credit. A model whose frames have more log-probs than cells (a flow model:
one per element of each SDE step's latent, laid out (S, c, rows, cols)) says so with `logprobs_per_frame`, a
multiple k of rows x cols; every one of a cell's k log-probs then gets the cell's advantage
(`expand_to_logprobs`), as SpatialFlow-GRPO weights each element's log-ratio by its pixel's advantage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.rewards.geometry import reproject

__all__ = ["DenseCredit", "token_grid", "expand_to_logprobs", "pool_to_tokens", "cell_flow", "patch_returns",
           "dense_advantages"]

PATCH_RETURNS = ("none", "same_cell", "flow")


@dataclass
class DenseCredit:
    """`credit: dense` settings of a GRPO recipe (the `dense:` section)."""

    patch_weight: float = 1.0
    """Weight of each token's group-normalised patch return in its advantage."""
    frame_weight: float = 1.0
    """Weight of the frame's return-to-go advantage (GRPO's per-frame credit) in every token's advantage."""
    patch_return: str = "none"
    """How a patch's return includes later frames: none | same_cell | flow (the simulator's correspondences)."""

    def __post_init__(self) -> None:
        if self.patch_return not in PATCH_RETURNS:
            raise ValueError(f"dense.patch_return={self.patch_return!r}; choose one of {', '.join(PATCH_RETURNS)}")
        for name in ("patch_weight", "frame_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"dense.{name}={value!r} must be a finite number >= 0")
        if self.patch_weight == 0 and self.frame_weight == 0:
            raise ValueError("dense.patch_weight and dense.frame_weight are both 0: no advantage, nothing trained")


def token_grid(model, image_size: tuple[int, int]) -> tuple[int, int]:
    """The model's (rows, cols) token grid, checked against its tokens per frame and the frame size."""
    grid = getattr(model, "token_grid", None)
    if grid is None:
        raise ValueError(f"credit: dense needs to know which pixels each token governs, and "
                         f"{type(model).__name__} does not say: give it a `token_grid` (rows, cols) attribute "
                         f"(tokens tile the frame row-major in equal cells; docs/models.md), or use credit: frame")
    rows, cols = (int(v) for v in grid)
    h, w = image_size
    per_frame = int(getattr(model, "logprobs_per_frame", model.tokens_per_frame))
    if per_frame % (rows * cols) or h % rows or w % cols:
        raise ValueError(f"{type(model).__name__}.token_grid={grid} does not tile {h}x{w} frames into its "
                         f"{per_frame} log-probs per frame")
    return rows, cols


def expand_to_logprobs(advantages: torch.Tensor, grid: tuple[int, int], per_frame: int) -> torch.Tensor:
    """(B, H * N) per-cell advantages -> (B, H * per_frame): each of a frame's per_frame // N log-probs (laid out
    (k, rows, cols)) takes its cell's advantage. The identity when per_frame == N (a token model).

    >>> expand_to_logprobs(torch.tensor([[1., 2., 3., 4.]]), (1, 2), 4).tolist()   # 2 frames, 2 cells, k = 2
    [[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]]
    """
    cells = grid[0] * grid[1]
    if per_frame == cells:
        return advantages
    b = advantages.shape[0]
    per_cell = advantages.view(b, -1, 1, cells).expand(-1, -1, per_frame // cells, -1)
    return per_cell.reshape(b, -1)


def pool_to_tokens(pixel_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, T, H, W) per-pixel values -> (B, T, rows * cols): each token's cell mean, in token order.

    >>> m = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> pool_to_tokens(m, (2, 2)).tolist()       # cells [[0,1],[4,5]], [[2,3],[6,7]], ...
    [[[2.5, 4.5, 10.5, 12.5]]]
    """
    b, t, h, w = pixel_map.shape
    rows, cols = grid
    cells = pixel_map.reshape(b, t, rows, h // rows, cols, w // cols)
    return cells.mean((3, 5)).reshape(b, t, rows * cols)


def cell_flow(depth: torch.Tensor, world_to_camera: torch.Tensor, intrinsics: torch.Tensor,
              grid: tuple[int, int], rel_tol: float = 0.05, abs_tol: float = 0.02) -> torch.Tensor:
    """Where each cell's content goes next, from the simulator's truth.

    depth (B, S, H, W) metric z of S consecutive true frames; world_to_camera (B, S, 4, 4); intrinsics
    (B, 3, 3). Returns (B, S - 1, N) long: for frame s and cell i, the cell of frame s + 1 that the scene
    point at cell i's centre pixel projects into, or -1 where it leaves the view or is hidden there (its
    projected depth disagrees with frame s + 1's depth by more than abs_tol + rel_tol * z, as in
    `consistency_3d`)."""
    b, s, h, w = depth.shape
    rows, cols = grid
    ch, cw = h // rows, w // cols
    centre_i = torch.arange(rows) * ch + ch // 2  # a pixel at each cell's centre
    centre_j = torch.arange(cols) * cw + cw // 2
    n = b * (s - 1)
    k = intrinsics[:, None].expand(b, s - 1, 3, 3).reshape(n, 3, 3).float()
    u, v, z = reproject(depth[:, :-1].reshape(n, h, w).float(), k, world_to_camera[:, :-1].reshape(n, 4, 4).float(),
                        world_to_camera[:, 1:].reshape(n, 4, 4).float())  # (n, H, W) each
    u, v, z = (x[:, centre_i][:, :, centre_j].reshape(n, rows * cols) for x in (u, v, z))
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (z > 1e-6)
    col = u.clamp(0, w - 1).long()
    row = v.clamp(0, h - 1).long()
    nxt = depth[:, 1:].reshape(n, h * w).float()
    seen = (nxt.gather(1, row * w + col) - z).abs() <= abs_tol + rel_tol * z.abs()
    target = (row // ch) * cols + col // cw
    return torch.where(inside & seen, target, torch.full_like(target, -1)).reshape(b, s - 1, rows * cols)


def patch_returns(patch_rewards: torch.Tensor, mode: str, flow: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N) per-token patch rewards -> (B, H, N) patch returns (see the module docstring).
    flow (B, H - 1, N) from `cell_flow`, for mode 'flow'.

    >>> r = torch.tensor([[[1., 2.], [3., 4.]]])            # 2 frames x 2 cells
    >>> patch_returns(r, "same_cell").tolist()
    [[[4.0, 6.0], [3.0, 4.0]]]
    >>> patch_returns(r, "flow", torch.tensor([[[1, -1]]])).tolist()   # cell 0 moves to cell 1; cell 1 leaves
    [[[5.0, 2.0], [3.0, 4.0]]]
    """
    if mode == "none":
        return patch_rewards
    if mode == "same_cell":
        return patch_rewards.flip(1).cumsum(1).flip(1)
    if mode != "flow":
        raise ValueError(f"patch_return={mode!r}; choose one of {', '.join(PATCH_RETURNS)}")
    if flow is None or flow.shape != (patch_rewards.shape[0], patch_rewards.shape[1] - 1, patch_rewards.shape[2]):
        raise ValueError("patch_return 'flow' needs the (B, H - 1, N) cell flow")
    out = patch_rewards.clone()
    for t in range(patch_rewards.shape[1] - 2, -1, -1):
        follow = out[:, t + 1].gather(1, flow[:, t].clamp_min(0))  # (B, N)
        out[:, t] += torch.where(flow[:, t] >= 0, follow, torch.zeros_like(follow))
    return out


def dense_advantages(frame_advantages: torch.Tensor, patch_return: torch.Tensor, valid: torch.Tensor,
                     settings: DenseCredit, reduce_sum=None) -> torch.Tensor:
    """Per-token advantages (B, H * N), frame-major as the tokens are.

    frame_advantages (B, H): GRPO's per-frame advantages; patch_return (B, H, N); valid (P, G) bool, B = P * G
    (rows of one prompt's group are consecutive). The patch term is centred per (prompt, frame, cell) over
    the group's valid samples and divided by one scale, the std of those centred values over every valid
    row of the batch; `reduce_sum(x) -> float` sums over processes (None: this process alone).
    Invalid rows get 0."""
    prompts, group = valid.shape
    b, horizon, n = patch_return.shape
    weight = valid.reshape(b, 1, 1).to(torch.float64)
    r = patch_return.double().reshape(prompts, group, horizon, n)
    w = weight.reshape(prompts, group, 1, 1)
    mean = (r * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
    centred = ((r - mean) * w).reshape(b, horizon, n)
    total, count = float(centred.square().sum()), float(weight.sum()) * horizon * n
    if reduce_sum is not None:
        total, count = reduce_sum(total), reduce_sum(count)
    scale = (total / max(count, 1.0)) ** 0.5
    patch = centred / (scale + 1e-8)
    frame = frame_advantages.double()[:, :, None].expand(b, horizon, n)
    out = settings.frame_weight * frame + settings.patch_weight * patch
    return (out * weight).reshape(b, horizon * n).float()
