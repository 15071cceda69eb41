"""The world-model protocol the trainers use, and the toolkit's own token world model.

    from posttrain.models import load_model
    model = load_model("default")                       # the embedded base model
    tokens = model.encode(frames)                        # (B, T, H, W, 3) uint8 -> (B, T, N)
    out = model.rollout(tokens[:, :2], actions, horizon=12, temperature=1.0, seeds=[0, 1])
    out.frames                                           # (B, 12, H, W, 3) float in [0, 1]
    model.score(torch.cat([tokens[:, :2], out.tokens], 1), actions, num_context=2)  # == out.logprobs

Plugging in another model: implement `WorldModel` (encode, decode, score, rollout, plus
`tokens_per_frame`, `vocab_size`, `lora_target_modules`, `frozen_modules`, forward == score and
save_pretrained); see "Bring your own world model" in docs/models.md, and docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from posttrain.envs3d.jobs import match_umask, read_json_object
from posttrain.kernels import sample, selective_log_softmax

from .dynamics import DynamicsConfig, DynamicsTransformer
from .tokenizer import FrameTokenizer, TokenizerConfig

ARCHITECTURE = "posttrain.TokenWorldModel"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class RolloutOutput:
    """What `rollout` returns. Shapes: B rollouts, H generated frames, N tokens per frame."""

    tokens: torch.Tensor
    """(B, H, N) sampled token ids."""
    logprobs: torch.Tensor
    """(B, H, N) log-probs of the sampled tokens under the tempered, untruncated distribution
    (what `score(..., temperature)` returns for the same tokens)."""
    frames: torch.Tensor | None = None
    """(B, H, H_img, W_img, 3) decoded frames in [0, 1], if decoded."""


@dataclass
class RolloutState:
    """An incremental rollout's progress (`TokenWorldModel.start_rollout` / `rollout_step`)."""

    context: torch.Tensor
    """(B, C, N) context tokens the rollout started from."""
    context_actions: torch.Tensor
    """(B, C - 1) actions between the context frames."""
    generators: list[torch.Generator] | None = None
    """One generator per rollout (from `seeds`), drawn from in order at every step."""
    generator: torch.Generator | None = None
    """A shared generator, used when there are no per-rollout seeds."""
    cache: list | None = None
    """Per-layer (k, v) of the last W - 1 frames; None before the first step."""
    latest: torch.Tensor | None = None
    """(B, N) the most recently sampled frame's tokens."""
    frames_sampled: int = 0
    """Frames sampled so far."""


def _seed_generators(seeds: list[int] | None, batch: int, device) -> list[torch.Generator] | None:
    if seeds is None:
        return None
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} rollouts")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@runtime_checkable
class WorldModel(Protocol):
    """What trainers, rewards and `posttrain eval` need from a world model: everything they use is here.

    Besides the attributes and methods below, a world model is a `torch.nn.Module` whose `forward` is
    `score` (the trainers' update calls the model, so DDP, DeepSpeed and PEFT wrappers see the call),
    and, for a full fine-tune, offers `save_pretrained(folder, metadata=None)` writing a folder that
    `load_model` reads back. LoRA wraps it in PEFT (`disable_adapter()` then gives the base back, the
    reference policy); the trainers never reach inside it (no `.tokenizer`, no module-name prefixes).
    """

    tokens_per_frame: int
    """N: tokens per frame."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    lora_target_modules: list[str]
    """Module names a LoRA adapter targets by default (recipes may override `lora.target_modules`)."""
    frozen_modules: tuple[str, ...]
    """Submodules a full fine-tune keeps frozen (e.g. the frame tokenizer that rewards decode with)."""
    # Optional: `decodes_with_reference: bool` and `decode(tokens, reference=None, gap=None)`, where `reference` is
    # the last true frame before `tokens` (B, H, W, 3) and `gap` its age in frames where it is not the default
    # (t + 1 for the t-th frame; play passes k for its k-th frame); callers go through `rollouts.decode_frames`.
    # Optional, for GRPO's `credit: dense` (not checked by isinstance): `token_grid: tuple[int, int]`,
    # (rows, cols) such that the frame's N = rows x cols tokens tile it row-major in equal cells and token i
    # governs cell (i // cols, i % cols); see posttrain/credit.py for what that makes exact and approximate.

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 or [0, 1] float frames -> (B, T, N) int64 tokens."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, N) tokens -> (B, T, H, W, 3) float frames in [0, 1]."""

    def score(self, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
              temperature: float = 1.0, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs (B, T - num_context, N) of frames num_context.. given earlier frames and actions.
        actions: (B, T - 1); actions[:, t] takes frame t to t + 1. Differentiable.

        `targets` (B, T - num_context, N), optional: score `targets[:, t]` instead of `tokens[:, C + t]`
        as the frame after `tokens[:, :C + t]` (the inputs stay `tokens`). Simulator-forcing uses it:
        the model's own frames as inputs, the simulator's true frames as targets. Models whose frames
        depend only on earlier frames (block-causal) do this in one pass; `forced_score_by_prefix`
        is the generic fallback (one pass per target frame)."""

    def rollout(self, context: torch.Tensor, actions: torch.Tensor, horizon: int, *, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seeds: list[int] | None = None,
                generator: torch.Generator | None = None, decode: bool = True) -> RolloutOutput:
        """Sample `horizon` frames after context tokens (B, C, N); actions (B, >= C + horizon - 1)
        (extra trailing actions are ignored)."""


def check_targets(tokens: torch.Tensor, num_context: int, targets: torch.Tensor | None) -> torch.Tensor:
    """`score`'s targets: `tokens[:, num_context:]` when None, else checked to have that shape."""
    if targets is None:
        return tokens[:, num_context:]
    expected = tokens[:, num_context:].shape
    if targets.shape != expected:
        raise ValueError(f"targets must be (B, T - num_context, N) = {tuple(expected)}, got {tuple(targets.shape)}")
    return targets


def forced_score_by_prefix(model, tokens: torch.Tensor, actions: torch.Tensor, num_context: int,
                           temperature: float, targets: torch.Tensor) -> torch.Tensor:
    """`score(tokens, ..., targets=targets)` for any model: one `score` call per target frame, on the
    prefix `tokens[:, :C + t]` followed by `targets[:, t]` (for models that read a frame's own earlier
    tokens while scoring it, e.g. token-by-token language-model backbones)."""
    return torch.cat([model.score(torch.cat([tokens[:, :num_context + t], targets[:, t: t + 1]], 1),
                                  actions[:, :num_context + t], num_context + t, temperature)
                      for t in range(targets.shape[1])], 1)


class TokenWorldModel(nn.Module):
    """FSQ frame tokenizer + block-causal dynamics transformer with a sliding-window KV cache."""

    def __init__(self, tokenizer_config: TokenizerConfig | None = None, dynamics_config: DynamicsConfig | None = None):
        super().__init__()
        tokenizer_config = tokenizer_config or TokenizerConfig()
        # The dynamics vocabulary and frame length are the tokenizer's, whatever the config said.
        dynamics_config = dataclasses.replace(dynamics_config or DynamicsConfig(),
                                              vocab_size=tokenizer_config.vocab_size,
                                              tokens_per_frame=tokenizer_config.tokens_per_frame)
        self.tokenizer = FrameTokenizer(tokenizer_config)
        self.dynamics = DynamicsTransformer(dynamics_config)

    # --- protocol ---------------------------------------------------------------------------
    lora_target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    """The dynamics transformer's linear layers (the tokenizer has no module of these names)."""
    frozen_modules = ("tokenizer",)

    @property
    def tokens_per_frame(self) -> int:
        return self.dynamics.config.tokens_per_frame

    @property
    def vocab_size(self) -> int:
        return self.dynamics.config.vocab_size

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """Tokens tile the frame row-major, one per `downsample` x `downsample` patch (dense credit)."""
        return self.tokenizer.config.grid, self.tokenizer.config.grid

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(frames)

    @property
    def decodes_with_reference(self) -> bool:
        """Whether `decode` uses a reference frame (`TokenizerConfig.reference`); see `decode_frames`."""
        return self.tokenizer.config.reference

    def decode(self, tokens: torch.Tensor, reference: torch.Tensor | None = None,
               gap: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.tokenizer.decode(tokens, reference, gap)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, num_context: int, temperature: float = 1.0,
                targets: torch.Tensor | None = None):
        """`score`, as `forward`: DDP and PEFT wrappers only see calls that go through forward."""
        return self.score(tokens, actions, num_context, temperature, targets)

    def next_frame_logits(self, tokens: torch.Tensor, actions: torch.Tensor, num_context: int) -> torch.Tensor:
        """Logits (B, T - num_context, N, V) for frames num_context.. (teacher forcing)."""
        self._check_actions(tokens, actions)
        hidden = self.dynamics(tokens[:, :-1], actions)  # (B, T-1, N, D): frame t predicts t+1
        return self.dynamics.logits(hidden[:, num_context - 1:])

    def score(self, tokens, actions, num_context, temperature=1.0, targets=None):
        if num_context < 1:
            raise ValueError(f"num_context={num_context} must be at least 1")
        targets = check_targets(tokens, num_context, targets)
        # Block-causal: frame t's logits see frames < t only, so any targets are scored in one pass.
        logits = self.next_frame_logits(tokens, actions, num_context)  # (B, T-C, N, V)
        # Greedy (T=0) rollouts report log-probs at temperature 1, as `sample` does.
        # Through the kernels' dispatch: Triton on CUDA, the torch reference elsewhere.
        return selective_log_softmax(logits, targets, temperature or 1.0)

    @torch.no_grad()
    def rollout(self, context, actions, horizon, *, temperature=1.0, top_k=None, top_p=None, seeds=None,
                generator=None, decode=True, use_cache=True) -> RolloutOutput:
        batch, num_context, n = context.shape
        needed = num_context + horizon - 1
        if actions.dim() != 2 or actions.shape[0] != batch or actions.shape[1] < needed:
            raise ValueError(f"actions must be (B, >= C + horizon - 1) = ({batch}, >= {needed}), "
                             f"got {tuple(actions.shape)}")
        actions = actions[:, :needed]
        tokens, logprobs = [], []
        if use_cache:
            # The cached path is `start_rollout` + one `rollout_step` per frame, so a live session that
            # steps frame by frame (posttrain play) gets exactly these tokens.
            state = self.start_rollout(context, actions[:, :num_context - 1], seeds=seeds, generator=generator)
            for step in range(horizon):
                frame, logprob = self.rollout_step(state, actions[:, num_context - 1 + step], temperature=temperature,
                                                   top_k=top_k, top_p=top_p)
                tokens.append(frame)
                logprobs.append(logprob)
        else:
            generators = _seed_generators(seeds, batch, context.device)
            for _ in range(horizon):
                # Full recompute from frame 0 (the benchmark's baseline). Recomputing only the last W
                # frames would differ: deeper layers' keys depend on each frame's own full window.
                sequence = torch.cat([context, *[t[:, None] for t in tokens]], 1)
                hidden = self.dynamics(sequence, actions[:, :sequence.shape[1]])[:, -1]
                frame, logprob = self._sample_frame(hidden, generators, generator, temperature, top_k, top_p)
                tokens.append(frame)
                logprobs.append(logprob)
        tokens_t, logprobs_t = torch.stack(tokens, 1), torch.stack(logprobs, 1)
        frames = self.decode(tokens_t) if decode else None
        return RolloutOutput(tokens=tokens_t, logprobs=logprobs_t, frames=frames)

    # --- incremental rollout (one frame per call) ---------------------------------------------
    def start_rollout(self, context: torch.Tensor, context_actions: torch.Tensor, *, seeds: list[int] | None = None,
                      generator: torch.Generator | None = None) -> RolloutState:
        """Begin a rollout that `rollout_step` advances one frame at a time, e.g. as a user steers.

        context: (B, C, N) tokens; context_actions: (B, C - 1), the actions between the context frames.
        Nothing runs yet: the first step needs the action taken after the last context frame.
        `start_rollout` + k `rollout_step`s give exactly `rollout(context, actions, k)`'s tokens and
        log-probs for the same seeds (`rollout` is written that way)."""
        batch, num_context, n = context.shape
        if num_context < 1 or n != self.tokens_per_frame:
            raise ValueError(f"context must be (B, C >= 1, {self.tokens_per_frame}) tokens, got {tuple(context.shape)}")
        if tuple(context_actions.shape) != (batch, num_context - 1):
            raise ValueError(f"context_actions must be (B, C - 1) = ({batch}, {num_context - 1}), "
                             f"got {tuple(context_actions.shape)}")
        return RolloutState(context=context, context_actions=context_actions,
                            generators=_seed_generators(seeds, batch, context.device), generator=generator)

    @torch.no_grad()
    def rollout_step(self, state: RolloutState, action: torch.Tensor, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the next frame after `action` (B,) int64, the action taken from the latest frame
        (the last context frame at the first call, else the previous sampled frame). Updates `state`
        (KV cache, latest frame); returns (tokens (B, N), log-probs (B, N)) as `rollout` does per frame."""
        batch = state.context.shape[0]
        if action.shape != (batch,):
            raise ValueError(f"action must be ({batch},), got {tuple(action.shape)}")
        if state.cache is None:
            # First frame: the whole context with its actions, as one masked forward that returns the cache.
            actions = torch.cat([state.context_actions, action[:, None]], 1)
            hidden, state.cache = self.dynamics(state.context, actions, return_cache=True)
            hidden = hidden[:, -1]
        else:
            index = state.context.shape[1] + state.frames_sampled - 1  # absolute index of the latest frame
            hidden, state.cache = self.dynamics.step(state.latest, action, index, state.cache)
        frame, logprob = self._sample_frame(hidden, state.generators, state.generator, temperature, top_k, top_p)
        state.latest = frame
        state.frames_sampled += 1
        return frame, logprob

    def _sample_frame(self, hidden, generators, generator, temperature, top_k, top_p):
        """Hidden (B, P, D) of the latest frame -> sampled next-frame tokens (B, N) and their log-probs."""
        batch, n = hidden.shape[0], self.tokens_per_frame
        logits = self.dynamics.logits(hidden).float().reshape(batch * n, -1)  # (B*N, V)
        uniform = None
        if generators is not None:
            uniform = torch.stack([torch.rand(n, generator=g, device=hidden.device) for g in generators]).reshape(-1)
        out = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform,
                     generator=generator, return_full_logprobs=True)
        return out.tokens.view(batch, n), out.full_logprobs.view(batch, n)

    @staticmethod
    def _check_actions(tokens: torch.Tensor, actions: torch.Tensor) -> None:
        if actions.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise ValueError(f"actions must be (B, T - 1) = {(tokens.shape[0], tokens.shape[1] - 1)}, "
                             f"got {tuple(actions.shape)}")

    # --- persistence ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, "tokenizer": dataclasses.asdict(self.tokenizer.config),
                "dynamics": dataclasses.asdict(self.dynamics.config)}

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None,
                        weights_dtype: str = "float32") -> Path:
        """Write config.json + model.safetensors (+ metadata in the config) to `folder`.

        weights_dtype "bfloat16" stores floating-point weights at half the size (a wider model then fits a
        size budget); `from_pretrained` loads them back into float32 parameters, so the loaded model is the
        bf16-rounded one, exactly and for every later use (score() still equals the rollout log-probs)."""
        from safetensors.torch import save_file

        dtype = weights_torch_dtype(weights_dtype)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config_dict()
        config["weights_dtype"] = weights_dtype
        if metadata:
            config["metadata"] = metadata
        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"architecture": ARCHITECTURE})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        match_umask(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> TokenWorldModel:
        """Load a `save_pretrained` folder. Errors name the folder and what is wrong; nothing is unpickled."""
        folder = Path(folder)
        config = read_model_config(folder, ARCHITECTURE, (CONFIG_FILE, WEIGHTS_FILE))
        try:
            model = cls(TokenizerConfig(**config["tokenizer"]), DynamicsConfig(**config["dynamics"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{folder / CONFIG_FILE}: bad model config ({exc})") from None
        state = read_safetensors(folder / WEIGHTS_FILE, map_location)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{folder / WEIGHTS_FILE} does not match its config: missing={missing[:5]} "
                             f"unexpected={unexpected[:5]} wrong shapes={wrong[:5]}")
        model.load_state_dict(state)
        model.metadata = config.get("metadata", {})
        return model.eval()


WEIGHTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype `save_pretrained(weights_dtype=name)` stores; a clear error for any other name."""
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)}, got {name!r}")
    return WEIGHTS_DTYPES[name]


def read_model_config(folder: Path, architecture: str, required: tuple[str, ...]) -> dict:
    """A model folder's config.json, after checking the folder, its `required` files and that the config
    names `architecture`. Errors name the folder or file and what is wrong."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    for name in required:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"model folder {folder} has no {name}")
    config = read_json_object(folder / CONFIG_FILE)
    if config.get("architecture") != architecture:
        raise ValueError(f"{folder / CONFIG_FILE}: unknown architecture {config.get('architecture')!r}; "
                         f"this loader reads {architecture!r}")
    return config


def read_safetensors(path: Path, map_location: str = "cpu") -> dict:
    """load_file with a one-line error for truncated or corrupt files (never unpickles)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt files
        raise ValueError(f"{path} cannot be read ({exc}); is the file complete?") from None


def weights_hash(folder: str | Path) -> str:
    """sha256 identifying a model folder's weights (adapters record their base's).

    The built-in format: the sha256 of model.safetensors (unchanged, so recorded hashes stay valid).
    The HFWorldModel format: the sha256 over backbone/*.safetensors and tokenizer.safetensors, each
    file's relative path then its bytes, in sorted order (a sharded backbone hashes every shard)."""
    folder = Path(folder)

    def update(digest, path: Path) -> None:  # in 1 MiB chunks: a multi-GB shard is never held in memory
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)

    if (folder / WEIGHTS_FILE).is_file():
        digest = hashlib.sha256()
        update(digest, folder / WEIGHTS_FILE)
        return digest.hexdigest()
    files = sorted(folder.glob("backbone/*.safetensors")) + sorted(folder.glob("tokenizer.safetensors"))
    if not files:  # a registered architecture of the user's own: every file but the config and the card
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (CONFIG_FILE, "README.md"))
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no weights files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        update(digest, path)
    return digest.hexdigest()
