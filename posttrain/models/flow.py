"""A flow-matching (rectified-flow) world model: each next frame is denoised from noise, conditioned on the
previous frames (clean, as channels) and the action (a class embedding that enters every residual block's
scale and shift, i.e. AdaGN/FiLM, through the time embedding).

    model = FlowWorldModel(FlowConfig(image_size=64))
    loss = model.flow_matching_loss(frames, actions)              # (B, T, H, W, 3) uint8, (B, T - 1)
    out = model.rollout_paths(frames[:, :2], actions, horizon=8, temperature=1.0, seeds=[0, 1])
    out.frames                                                    # (B, 8, H, W, 3) in [0, 1]
    model.score_paths(frames[:, :2], out.paths, actions, temperature=1.0)   # == out.logprobs

For what reads the world-model protocol (trainers, `posttrain eval`, the report, play), a frame's "tokens" are
its payload: its denoising path, flattened (`encode` gives a true frame's clean state at every step, `decode`
reads the last state); `rollout` returns sampled paths with per-element log-probs (B, H, S c h w), and the
forward scores exactly those (docs/architecture.md, "One protocol, two model families").

The maths (x_t = (1 - t) x_0 + t eps, t = 1 is noise, the velocity is v = eps - x_0):
* Deterministic sampling ("greedy", temperature 0) integrates the ODE dx/dt = v from t = 1 to 0 with Euler
  steps on `sample_steps` evenly spaced times.
* Stochastic sampling (temperature > 0) replaces the Euler steps listed in `sde_steps` by Flow-GRPO's
  marginal-preserving SDE step (Liu et al. 2025, arXiv 2505.05470): for a step from t to t - d,
  mean = x - d [v + s^2 / (2 t) (x + (1 - t) v)], std = s sqrt(d), with s = a sqrt(t / (1 - t)) and
  a = `noise_level` x temperature (t = 1 uses the next time's s, as Flow-GRPO does, where s is infinite).
  The step's log-density is a diagonal Gaussian's, exact; the other steps are deterministic.
* A rollout's stochastic choices are the denoising path of each frame: the states x_t at every time of the
  schedule (`paths`). `score_paths` recomputes each stochastic step's log-density of the recorded next
  state under the current weights: what a policy-gradient trainer needs, and equal to the rollout's
  `logprobs` up to float rounding.

The denoiser is `diffusers.UNet2DModel` (its conv blocks, attention and timestep embedding), or any module of
yours with the same call (`FlowWorldModel(config, denoiser=...)`). It denoises in pixel space (`space: pixels`)
or in a frozen frame tokenizer's FSQ latent (`space: latent`, `FlowWorldModel.latent(tokenizer)`): 4 x 16 x 16
values for the default tokenizer instead of 3 x 64 x 64, decoded by the tokenizer's decoder.
GRPO (rollout, frame and dense credit), DPO, SFT (the flow-matching loss), play, eval and pre-training
(`posttrain.pretrain_flow`) take it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from posttrain.envs3d.actions import NUM_ACTIONS

ARCHITECTURE = "posttrain.FlowWorldModel"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowConfig:
    """Shape and sampler of a FlowWorldModel."""

    image_size: int = 64
    """Frames are image_size x image_size RGB."""
    context_frames: int = 2
    """Clean previous frames the denoiser sees (channels beside the noisy frame)."""
    num_actions: int = NUM_ACTIONS
    """Action ids are in [0, num_actions]; id num_actions is the null action (footage without actions)."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """UNet2DModel widths, one resolution level each (the last level has self-attention)."""
    layers_per_block: int = 1
    """Residual blocks per level."""
    norm_num_groups: int = 8
    """GroupNorm groups (must divide every width)."""
    sample_steps: int = 3
    """Denoising steps per frame (evenly spaced times from 1 to 0)."""
    sde_steps: tuple[int, ...] = (0,)
    """Which of the steps are stochastic when temperature > 0 (Flow-GRPO-Fast: a few trained steps)."""
    noise_level: float = 0.7
    """Flow-GRPO's a: the SDE's diffusion scale at temperature 1."""
    space: str = "pixels"
    """Where frames are denoised: "pixels" (the frame in [-1, 1], 3 x image_size^2) or "latent" (the frozen
    frame tokenizer's FSQ latent, len(levels) x grid^2, decoded by its decoder: 12x fewer elements for the
    default tokenizer; see docs/models.md for the measured trade-off)."""
    tokenizer: dict = field(default_factory=dict)
    """space "latent": the TokenizerConfig of the frozen tokenizer (its weights are in the checkpoint)."""
    snap: bool = True
    """space "latent": round a sampled latent to the FSQ grid before decoding (the decoder was trained on grid
    values only). The state, its path and its log-probs are the unrounded ones."""

    def __post_init__(self) -> None:
        self.block_out_channels, self.sde_steps = tuple(self.block_out_channels), tuple(self.sde_steps)
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps={self.sample_steps} must be at least 1")
        if any(not 0 <= s < self.sample_steps for s in self.sde_steps) or len(set(self.sde_steps)) != len(self.sde_steps):
            raise ValueError(f"sde_steps={self.sde_steps} must be distinct steps in [0, {self.sample_steps})")
        if self.sample_steps == 1 and self.sde_steps:
            # The SDE's noise scale at t = 1 is infinite and is taken from the next time, which is 0 here: the
            # step would have std 0 and no density.
            raise ValueError("sample_steps=1 leaves no stochastic step (its noise scale would be 0): use 2 or more "
                             "steps, or sde_steps=[] for a deterministic sampler")
        if self.context_frames < 1:
            raise ValueError(f"context_frames={self.context_frames} must be at least 1")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level={self.noise_level} must be > 0")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every width {self.block_out_channels}")
        if self.space not in ("pixels", "latent"):
            raise ValueError(f"space={self.space!r}; choose pixels or latent")
        if self.space == "latent" and not self.tokenizer:
            return  # a recipe's section: FlowWorldModel.latent(tokenizer, config) fills it in, then checks again
        if self.space == "latent":
            from .tokenizer import TokenizerConfig

            tokenizer = TokenizerConfig(**self.tokenizer)
            if tokenizer.image_size != self.image_size:
                raise ValueError(f"tokenizer.image_size={tokenizer.image_size} differs from image_size={self.image_size}")
        if self.state_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"the {self.state_size}x{self.state_size} state must halve "
                             f"{len(self.block_out_channels) - 1} times (one per U-Net level after the first)")

    @property
    def state_size(self) -> int:
        """Side of the denoised state: image_size in pixels, the tokenizer's grid in latent space."""
        if self.space == "latent":
            from .tokenizer import TokenizerConfig

            return TokenizerConfig(**self.tokenizer).grid
        return self.image_size

    @property
    def state_channels(self) -> int:
        """Channels of the denoised state: 3 (RGB) or the tokenizer's latent channels."""
        return len(self.tokenizer["levels"]) if self.space == "latent" else 3

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return self.state_channels, self.state_size, self.state_size


@dataclass
class FlowRollout:
    """What `FlowWorldModel.rollout_paths` returns. B rollouts, H frames, K = sample_steps."""

    frames: torch.Tensor | None
    """(B, H, H_px, W_px, 3) generated frames in [0, 1] (None when not decoded)."""
    paths: torch.Tensor
    """(B, H, K + 1, c, h, w) each frame's denoising states (`FlowConfig.state_shape`), from the noise (t = 1) to
    the frame (t = 0)."""
    logprobs: torch.Tensor
    """(B, H, S) log-density of each stochastic step's next state (S = len(sde_steps); 0 when greedy)."""
    element_logprobs: torch.Tensor = field(default=None)
    """(B, H, S, c h w) the same per element (they sum to `logprobs`)."""
    times: torch.Tensor = field(default=None)
    """(K + 1,) the schedule's times, 1 .. 0."""


@dataclass
class FlowRolloutState:
    """A rollout in progress (`start_rollout` / `rollout_step`)."""

    states: torch.Tensor
    """(B, <= context_frames, c, h, w) the latest clean states: what the next frame is conditioned on."""
    generators: list[torch.Generator] | None
    """One per rollout (from `seeds`), or None: torch's global generator."""


class FlowWorldModel(nn.Module):
    """Action-conditioned rectified-flow next-frame model, in pixel space or a frozen tokenizer's latent space.
    The denoiser is a diffusers UNet2DModel built from the config, or any module passed as `denoiser` (bring
    your own: see below)."""

    def __init__(self, config: FlowConfig | None = None, denoiser: nn.Module | None = None,
                 architecture: str = ARCHITECTURE):
        """`denoiser`, optional: your own module, called as `denoiser(inputs, timesteps, class_labels=actions)`
        with inputs (B, c (1 + context_frames), h, w) (the noisy state, then the clean context states; (c, h, w)
        is `config.state_shape`: (3, H, W) frames in [-1, 1] in pixel space), timesteps (B,) = 1000 t, actions
        (B,) ids in [0, num_actions]; it returns the velocity (B, c, h, w), as a tensor or an object with `.sample` (diffusers' output). Its `lora_target_modules`
        attribute, if any, names what LoRA adapts. Such a model saves with `architecture`, the name you
        register a loader under (`posttrain.models.register_architecture`) that rebuilds it with
        `FlowWorldModel.from_pretrained(folder, map_location, denoiser=YourModule(...))`."""
        super().__init__()
        self.config = config or FlowConfig()
        if self.config.space == "latent" and not self.config.tokenizer:
            raise ValueError("space='latent' needs the frozen tokenizer's config in `tokenizer`: build the model with "
                             "FlowWorldModel.latent(tokenizer, config)")
        self.architecture = architecture
        if denoiser is None:
            if architecture != ARCHITECTURE:
                raise ValueError(f"architecture={architecture!r} is for a model with your own denoiser; pass it")
            # channels_last: mkldnn's convolutions instead of the slow im2col path, ~1.4x faster on CPU.
            denoiser = self.unet(self.config).to(memory_format=torch.channels_last)
        self.denoiser = denoiser
        self.tokenizer = None
        if self.config.space == "latent":
            from .tokenizer import FrameTokenizer, TokenizerConfig

            self.tokenizer = FrameTokenizer(TokenizerConfig(**self.config.tokenizer)).eval()
            self.tokenizer.requires_grad_(False)

    @classmethod
    def latent(cls, tokenizer: nn.Module, config: FlowConfig | None = None, **kwargs) -> FlowWorldModel:
        """A latent-space model around a copy of `tokenizer` (a FrameTokenizer, e.g. `load_model("default")
        .tokenizer`): config's space and tokenizer fields are set from it."""
        from dataclasses import replace

        config = replace(config or FlowConfig(), space="latent", image_size=tokenizer.config.image_size,
                         tokenizer=asdict(tokenizer.config))
        model = cls(config, **kwargs)
        model.tokenizer.load_state_dict(tokenizer.state_dict())
        return model

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        """Full fine-tuning never trains the latent space's tokenizer (its decoder draws every frame)."""
        return ("tokenizer",) if self.tokenizer is not None else ()

    def train(self, mode: bool = True) -> FlowWorldModel:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    @staticmethod
    def unet(config: FlowConfig) -> nn.Module:
        """The built-in denoiser: a diffusers UNet2DModel whose last level has self-attention; the action is
        its class embedding (added to the timestep embedding, which scales and shifts every block)."""
        from diffusers import UNet2DModel

        levels = len(config.block_out_channels)
        channels = config.state_channels
        return UNet2DModel(
            sample_size=config.state_size, in_channels=channels * (1 + config.context_frames), out_channels=channels,
            block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            norm_num_groups=config.norm_num_groups, num_class_embeds=config.num_actions + 1,
            resnet_time_scale_shift="scale_shift", attention_head_dim=8,
        )

    @property
    def lora_target_modules(self) -> list[str]:
        """The built-in U-Net's attention projections and residual-block convolutions, or your denoiser's
        `lora_target_modules`."""
        if self.architecture == ARCHITECTURE:
            # Full names under the denoiser: a latent model's tokenizer has conv1/conv2 too, and stays frozen.
            leaves = ("to_q", "to_k", "to_v", "conv1", "conv2")
            return [f"denoiser.{name}" for name, _ in self.denoiser.named_modules()
                    if name.rsplit(".", 1)[-1] in leaves or name.endswith("to_out.0")]
        return list(getattr(self.denoiser, "lora_target_modules", []))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # --- spaces -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return self.config.state_shape

    def to_space(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 or [0, 1] float frames -> (..., c, h, w) states in the weights' dtype: the frame in
        [-1, 1], or its tokenizer latent (FSQ grid values in [-1, 1])."""
        x = frames.to(self.dtype) / 255 if frames.dtype == torch.uint8 else frames.to(self.dtype)
        if self.tokenizer is None:
            return (x * 2 - 1).movedim(-1, -3)
        lead = frames.shape[:-3]
        with torch.no_grad():
            z = self.tokenizer.encoder(self.tokenizer.to_input(x)).float().permute(0, 2, 3, 1)
            latents, _ = self.tokenizer.fsq(z)
        return latents.permute(0, 3, 1, 2).reshape(*lead, *self.state_shape).to(self.dtype)

    def from_space(self, x: torch.Tensor) -> torch.Tensor:
        """(..., c, h, w) states -> (..., H, W, 3) frames in [0, 1]."""
        if self.tokenizer is None:
            return ((x.movedim(-3, -1) + 1) / 2).clamp(0, 1)
        lead = x.shape[:-3]
        z = x.reshape(-1, *x.shape[-3:]).float()
        if self.config.snap:  # to the nearest FSQ code: integers -(L // 2) .. L - 1 - L // 2, over L // 2
            levels = self.tokenizer.fsq.levels.view(1, -1, 1, 1)
            half = levels // 2
            z = torch.minimum(torch.maximum((z * half).round(), -half), levels - 1 - half) / half
        with torch.no_grad():
            frames = ((self.tokenizer.decoder(z.to(self.dtype)).float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        return frames.reshape(*lead, *frames.shape[-3:])

    # --- the world-model protocol (what trainers, eval and play read) -------------------------------
    # A frame's "tokens" are its payload: the denoising path of the frame, (K + 1) states from the noise to the
    # frame, flattened. A sampled frame's payload is the path its SDE took (its stochastic choices); a true
    # frame's is its clean state at every step. `decode` reads the last state; `forward` scores the paths.
    @property
    def payload_shape(self) -> tuple[int, int, int, int]:
        """(K + 1, c, h, w): a frame's payload before flattening."""
        return (self.config.sample_steps + 1, *self.state_shape)

    @property
    def tokens_per_frame(self) -> int:
        """Payload values per frame, (K + 1) c h w."""
        return math.prod(self.payload_shape)

    @property
    def logprobs_per_frame(self) -> int:
        """Log-densities per frame that `rollout` returns and `forward` scores: one per element of each
        stochastic step's state, S c h w (the step's Gaussian is diagonal, so they sum to its log-density)."""
        return len(self.config.sde_steps) * math.prod(self.state_shape)

    @property
    def token_grid(self) -> tuple[int, int]:
        """GRPO's dense credit: the state's h x w cells tile the frame row-major (4x4-pixel cells in the default
        tokenizer's latent, single pixels in pixel space); a frame's log-probs are laid out (S, c, h, w), so
        each cell owns S c of them (`posttrain.credit.expand_to_logprobs`)."""
        return self.config.state_size, self.config.state_size

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) frames -> (B, T, (K + 1) c h w) payloads: each frame's clean state at every step."""
        states = self.to_space(frames)
        return states.unsqueeze(-4).expand(*states.shape[:-3], *self.payload_shape).flatten(-4)

    def final_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., (K + 1) c h w) payloads -> (..., c, h, w) the frames' clean states (the paths' last states)."""
        return tokens.unflatten(-1, self.payload_shape)[..., -1, :, :, :]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, (K + 1) c h w) payloads -> (B, T, H, W, 3) frames in [0, 1]."""
        return self.from_space(self.final_states(tokens))

    @torch.no_grad()
    def rollout(self, context: torch.Tensor, actions: torch.Tensor, horizon: int, *, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seeds: list[int] | None = None,
                generator: torch.Generator | None = None, decode: bool = True):
        """The protocol's rollout: context (B, C, P) payloads from `encode` -> RolloutOutput(tokens (B, H, P) the
        sampled paths, logprobs (B, H, S c h w) float64 per-element log-densities of the stochastic steps, frames).
        `forward(cat(context, tokens), ...)` gives the same log-probs under the same weights."""
        from .world_model import RolloutOutput

        if top_k is not None or top_p is not None:
            raise ValueError("a flow model samples by its SDE: top_k / top_p do not apply")
        if generator is not None:
            raise ValueError("a flow model takes per-rollout `seeds`, not a shared generator")
        states = self.final_states(context)
        out = self.rollout_paths(None, actions, horizon, temperature=temperature, seeds=seeds,
                                 context_in_space=states, decode=decode)
        return RolloutOutput(tokens=out.paths.flatten(2), logprobs=out.element_logprobs.flatten(2),
                             frames=out.frames if decode else None)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, num_context: int, temperature: float = 1.0,
                targets: torch.Tensor | None = None, objective: str = "score",
                noise_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """The protocol's `score`, and SFT's objective.

        objective "score" (what GRPO and DPO call): (B, T - num_context, S c h w) per-element log-densities of
        the stochastic steps of the paths in frames num_context.. of `tokens` (B, T, P), each frame conditioned on
        the clean (last) states of the frames before it; equal to `rollout`'s log-probs; differentiable.

        objective "flow_matching" (SFT's `sft_objective`): (B, T - num_context, c h w), minus the squared velocity
        error of every element of those frames' clean states, each frame noised at its own t ~ U(0, 1) with noise
        from torch's global generator (which checkpoints restore), or, with `noise_seeds` (B,), from one generator
        per row seeded by it (SFT's: then micro-batches and processes draw what one full batch would). A surrogate log-likelihood: the denoising
        error bounds -log p up to constants and weights (Diffusion-DPO uses it so); with it, SFT's mean token
        cross-entropy is the flow-matching loss per element.

        objective "velocity_residual" (GRPO's DiffusionNFT loss): the signed v_pred - (eps - x_0) of the same
        elements, at the same draws."""
        if targets is not None:
            raise ValueError("a flow model has no forced scoring (targets=) yet")
        states = self.final_states(tokens).to(self.dtype)
        if objective == "score":
            paths = tokens[:, num_context:].unflatten(-1, self.payload_shape).to(self.dtype)
            return self._score_elements(states, paths, actions, num_context, temperature).flatten(2)
        if objective not in ("flow_matching", "velocity_residual"):
            raise ValueError(f"objective={objective!r}; choose score, flow_matching or velocity_residual")
        b, length = states.shape[:2]
        targets_shape = (length - num_context, *states.shape[2:])
        if noise_seeds is None:
            t = torch.rand(b, length - num_context, device=states.device, dtype=self.dtype)
            noise = torch.randn(b, *targets_shape, device=states.device, dtype=self.dtype)
        else:
            generators = [torch.Generator().manual_seed(int(seed)) for seed in noise_seeds]
            t = torch.stack([torch.rand(length - num_context, generator=g) for g in generators]).to(states)
            noise = torch.stack([torch.randn(targets_shape, generator=g) for g in generators]).to(states)
        residual = self._velocity_residual(states, actions, num_context, t, noise).flatten(2)
        return residual if objective == "velocity_residual" else -residual.square()

    sft_objective = "flow_matching"
    """What SFT trains (passed to `forward` as `objective`): the flow-matching loss, not the paths' density."""

    @property
    def sft_values_per_frame(self) -> int:
        """Loss terms per target frame under `sft_objective`: the state's c h w elements."""
        return math.prod(self.state_shape)

    def set_sample_steps(self, steps: int) -> None:
        """Sample each frame in `steps` Euler steps from now on (`posttrain play/eval --sample-steps`). The denoiser
        learnt continuous times t ~ U(0, 1), so any count is a sampler of the same model: fewer is faster and
        coarser (benchmarks/bench_flow_steps.py measures both). Stochastic steps past the new count are dropped;
        if none is left, step 0 is the stochastic one. A frame's payload holds K + 1 states, so set this before
        rolling out, never between a rollout and its scoring."""
        sde_steps = tuple(s for s in self.config.sde_steps if s < steps) or (0,)
        self.config = replace(self.config, sample_steps=steps, sde_steps=sde_steps)

    def times(self, device=None) -> torch.Tensor:
        """(K + 1,) float32 times 1, 1 - 1/K, ..., 0."""
        k = self.config.sample_steps
        return torch.linspace(1.0, 0.0, k + 1, device=device)

    # --- the denoiser -------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | context, action): x_t (B, c, h, w), t (B,) in [0, 1], context (B, C, c, h, w) clean
        states, action (B,) ids."""
        inputs = torch.cat([x_t, context.flatten(1, 2)], 1).contiguous(memory_format=torch.channels_last)
        out = self.denoiser(inputs, t * 1000, class_labels=action)
        return out.sample if hasattr(out, "sample") else out

    def _context(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The `context_frames` frames before frame `index` of x (B, T, c, h, w); the first frame repeats
        where there are fewer."""
        c = self.config.context_frames
        picks = [max(index - c + j, 0) for j in range(c)]
        return x[:, picks]

    def flow_matching_loss(self, frames: torch.Tensor, actions: torch.Tensor, num_context: int = 1,
                           generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error between the predicted and the true velocity (eps - x_0) of every frame
        num_context.. of `frames` (B, T, H, W, 3), each noised at its own time t ~ U(0, 1) with its own
        eps ~ N(0, I); `t` (B, T - num_context) and `noise` (B, T - num_context, c, h, w) may be given."""
        x = self.to_space(frames)  # (B, T, c, h, w)
        b, length = x.shape[:2]
        if t is None:
            t = torch.rand(b, length - num_context, generator=generator, device=x.device)
        if noise is None:
            noise = torch.randn(b, length - num_context, *x.shape[2:], generator=generator, device=x.device)
        return self._velocity_error(x, actions, num_context, t.to(x.dtype), noise.to(x.dtype)).mean()

    def _velocity_error(self, x: torch.Tensor, actions: torch.Tensor, num_context: int, t: torch.Tensor,
                        noise: torch.Tensor) -> torch.Tensor:
        """(B, F, c, h, w) squared error of the predicted velocity of frames num_context.. of states x (B, T, c,
        h, w), frame f noised at time t[:, f] with `noise`[:, f]; F = T - num_context."""
        return self._velocity_residual(x, actions, num_context, t, noise).square()

    def _velocity_residual(self, x: torch.Tensor, actions: torch.Tensor, num_context: int, t: torch.Tensor,
                           noise: torch.Tensor) -> torch.Tensor:
        """(B, F, c, h, w) predicted minus true velocity (eps - x_0), as `_velocity_error` without the square."""
        length, targets = x.shape[1], x.shape[1] - num_context
        x0 = x[:, num_context:]
        x_t = (1 - t)[..., None, None, None] * x0 + t[..., None, None, None] * noise
        context = torch.stack([self._context(x, num_context + i) for i in range(targets)], 1)  # (B, F, C, c, h, w)
        action = actions[:, num_context - 1: length - 1]  # the action into each target frame
        v = self.velocity(x_t.flatten(0, 1), t.flatten(), context.flatten(0, 1), action.flatten())
        return v.view_as(x0) - (noise - x0)

    # --- sampling -----------------------------------------------------------------------------------
    def _noise_scale(self, times: torch.Tensor, k: int, temperature: float) -> float:
        t = float(times[k]) if float(times[k]) < 1 else float(times[1])  # s is infinite at t = 1
        return self.config.noise_level * temperature * math.sqrt(t / (1 - t))

    def _step(self, x: torch.Tensor, v: torch.Tensor, times: torch.Tensor, k: int, temperature: float):
        """The step from times[k] to times[k + 1]: (mean, std) with std None for a deterministic step."""
        t, d = float(times[k]), float(times[k] - times[k + 1])
        if temperature > 0 and k in self.config.sde_steps:
            s = self._noise_scale(times, k, temperature)
            mean = x - d * (v + s * s / (2 * t) * (x + (1 - t) * v))
            return mean, s * math.sqrt(d)
        return x - d * v, None

    @staticmethod
    def gaussian_logprob_elements(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
        """(B, E) float64 log N(x_e; mean_e, std^2) of every element of (B, ...) x."""
        z = ((x - mean).double() / std).flatten(1)
        return -(0.5 * z.square() + math.log(std) + 0.5 * _LOG_2PI)

    @classmethod
    def gaussian_logprob(cls, x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
        """(B,) log N(x; mean, std^2 I) summed over every element but the first axis (float64 sums)."""
        return cls.gaussian_logprob_elements(x, mean, std).sum(1)

    def _generators(self, seeds, batch):
        if seeds is None:
            return None
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} rollouts")
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @staticmethod
    def _randn(like: torch.Tensor, generators) -> torch.Tensor:
        """Standard normal noise shaped like `like`, one generator per row (float32 draws, then cast: the
        same seeds give the same noise in any dtype)."""
        if generators is None:
            return torch.randn(like.shape, device=like.device).to(like.dtype)
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like)

    @torch.no_grad()
    def rollout_paths(self, context: torch.Tensor, actions: torch.Tensor, horizon: int, *, temperature: float = 1.0,
                      seeds: list[int] | None = None, context_in_space: torch.Tensor | None = None,
                      decode: bool = True) -> FlowRollout:
        """Sample `horizon` frames after context frames (B, C, H, W, 3) (uint8 or [0, 1]; or exactly the states
        `context_in_space` (B, C, c, h, w)); actions (B, >= C + horizon - 1). Temperature 0: the deterministic
        ODE; > 0: the SDE on `sde_steps`. Written as `start_rollout` + `horizon` x `_sample_frame`, so play's
        frame-by-frame rollout is exactly this one."""
        x = self.to_space(context) if context_in_space is None else context_in_space.to(self.dtype)
        c = x.shape[1]
        state = self._start(x, seeds)
        paths, logprobs = [], []
        for h in range(horizon):
            path, logprob = self._sample_frame(state, actions[:, c + h - 1], temperature)
            paths.append(path)
            logprobs.append(logprob)
        paths, elements = torch.stack(paths, 1), torch.stack(logprobs, 1)
        return FlowRollout(frames=self.from_space(paths[:, :, -1]) if decode else None, paths=paths,
                           logprobs=elements.sum(-1), element_logprobs=elements, times=self.times(x.device).to(x.dtype))

    def start_rollout(self, context: torch.Tensor, context_actions: torch.Tensor, *, seeds: list[int] | None = None,
                      generator: torch.Generator | None = None) -> FlowRolloutState:
        """Begin a rollout that `rollout_step` advances one frame at a time (`posttrain play`): context (B, C,
        P) payloads from `encode`; context_actions (B, C - 1) (unused: the denoiser conditions on the action
        into the frame it draws). `start_rollout` + k `rollout_step`s give `rollout(context, actions, k)`'s states
        and log-probs for the same seeds."""
        if generator is not None:
            raise ValueError("a flow model takes per-rollout `seeds`, not a shared generator")
        if tuple(context_actions.shape) != (context.shape[0], context.shape[1] - 1):
            raise ValueError(f"context_actions must be (B, C - 1) = ({context.shape[0]}, {context.shape[1] - 1}), "
                             f"got {tuple(context_actions.shape)}")
        return self._start(self.final_states(context).to(self.dtype), seeds)

    @torch.no_grad()
    def rollout_step(self, state: FlowRolloutState, action: torch.Tensor, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next frame after `action` (B,): (its path as a payload (B, P), per-element log-probs (B, S c h w) of
        its stochastic steps), as `rollout` gives per frame. Updates `state`."""
        if top_k is not None or top_p is not None:
            raise ValueError("a flow model samples by its SDE: top_k / top_p do not apply")
        if tuple(action.shape) != (state.states.shape[0],):
            raise ValueError(f"action must be ({state.states.shape[0]},), got {tuple(action.shape)}")
        path, logprob = self._sample_frame(state, action, temperature)
        return path.flatten(1), logprob.flatten(1)

    def _start(self, x: torch.Tensor, seeds: list[int] | None) -> FlowRolloutState:
        if x.shape[1] < 1:
            raise ValueError("a rollout needs at least one context frame")
        return FlowRolloutState(states=x, generators=self._generators(seeds, x.shape[0]))

    def _sample_frame(self, state: FlowRolloutState, action: torch.Tensor, temperature: float):
        """Denoise the frame after state.states given `action` (B,): (its path (B, K + 1, c, h, w), per-element
        log-densities (B, S, c h w) of its stochastic steps, float64). Appends the frame to state.states (kept to the last
        context_frames states: all the denoiser reads)."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        x, generators = state.states, state.generators
        b = x.shape[0]
        times = self.times(x.device).to(x.dtype)
        current = self._randn(x[:, 0], generators)
        window = self._context(x, x.shape[1])
        path, steps = [current], []
        for k in range(self.config.sample_steps):
            v = self.velocity(current, times[k].expand(b), window, action)
            mean, std = self._step(current, v, times, k, temperature)
            if std is None:
                current = mean
            else:
                current = mean + std * self._randn(mean, generators)
                steps.append(self.gaussian_logprob_elements(current, mean, std))
            path.append(current)
        state.states = torch.cat([x, current[:, None]], 1)[:, -self.config.context_frames:]
        logprob = (torch.stack(steps, 1) if steps else
                   torch.zeros(b, 0, math.prod(self.state_shape), dtype=torch.float64, device=x.device))
        return torch.stack(path, 1), logprob

    def score_paths(self, context: torch.Tensor, paths: torch.Tensor, actions: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
        """(B, H, S) log-densities of the stochastic steps of `paths` (B, H, K + 1, c, h, w) under the current
        weights, given the context frames (B, C, H, W, 3); differentiable; equal to `rollout_paths`' logprobs."""
        states = torch.cat([self.to_space(context), paths[:, :, -1]], 1)
        return self._score_elements(states, paths, actions, context.shape[1], temperature).sum(-1)

    def _score_elements(self, states: torch.Tensor, paths: torch.Tensor, actions: torch.Tensor, start: int,
                        temperature: float) -> torch.Tensor:
        """(B, H, S, c h w) per-element log-densities of the stochastic steps of `paths` (B, H, K + 1, c, h, w),
        the frames start.. of `states` (B, start + H, c, h, w). All H x S steps go through the denoiser in one
        batch (each frame's conditioning is the clean states before it)."""
        if temperature <= 0:
            raise ValueError("a deterministic (temperature 0) path has no stochastic step to score")
        b, horizon = states.shape[0], paths.shape[1]
        times, steps = self.times(states.device).to(states.dtype), sorted(self.config.sde_steps)
        windows = torch.stack([self._context(states, start + h) for h in range(horizon)], 1)  # (B, H, C', c, h, w)
        action = actions[:, start - 1: start + horizon - 1]  # (B, H)
        noisy = paths[:, :, steps]  # (B, H, S, c, h, w)
        s_count = len(steps)
        t = times[steps].repeat(b * horizon)
        v = self.velocity(noisy.flatten(0, 2), t, windows.repeat_interleave(s_count, 1).flatten(0, 1),
                          action.repeat_interleave(s_count, 1).flatten())
        v = v.view(b, horizon, s_count, *v.shape[1:])
        out = []
        for i, k in enumerate(steps):
            mean, std = self._step(noisy[:, :, i].flatten(0, 1), v[:, :, i].flatten(0, 1), times, k, temperature)
            out.append(self.gaussian_logprob_elements(paths[:, :, k + 1].flatten(0, 1), mean, std).view(b, horizon, -1))
        return torch.stack(out, 2)

    # --- save / load --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """config.json + model.safetensors; nothing pickled."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architecture": self.architecture, "flow": asdict(self.config),
                  **({"metadata": metadata} if metadata else {})}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"architecture": self.architecture})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu",
                        denoiser: nn.Module | None = None) -> FlowWorldModel:
        """Load a `save_pretrained` folder; `denoiser`: your module, for a folder saved with your own one."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        architecture = config.get("architecture")
        if denoiser is None and architecture != ARCHITECTURE:
            raise ValueError(f"{folder / CONFIG_FILE}: architecture {architecture!r} is not {ARCHITECTURE!r}; a flow "
                             f"model with your own denoiser loads with from_pretrained(folder, denoiser=...)")
        try:
            model = cls(FlowConfig(**config["flow"]), denoiser=denoiser, architecture=architecture)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{folder / CONFIG_FILE}: bad flow model config ({exc})") from None
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=map_location))
        return model
