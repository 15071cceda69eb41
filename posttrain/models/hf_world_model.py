"""A world model on any Hugging Face causal LM over frame tokens interleaved with actions.

    posttrain models init --arch llama --layers 4 --width 128 --out models/llama-wm   # a fresh one
    from posttrain.models import load_model
    model = load_model("models/llama-wm")                # dispatches on config.json's "architecture"

The sequence follows iVideoGPT / RLVR-World: [frame 0][a0][frame 1][a1]...[frame T-1], each frame
its N tokens in raster order. LM ids: frame codes 0..V-1 (the frame tokenizer's), then action a at
V + a (a = num_actions is the null action for unlabelled footage). No BOS: frame 0 is only ever
context (num_context >= 1), so nothing predicts it. Unlike the built-in `TokenWorldModel`, which
predicts a frame's N tokens in parallel, this model samples them one token at a time (an LM's KV
cache), so a rollout costs N forward steps per frame instead of one.

Departures: log-probs (`score`, `rollout`) are over frame codes only: the action ids' logits are
left out of the softmax at frame positions, as a model that never emits an action there should.
The whole sequence is attended (no sliding window): T frames take T * (N + 1) - 1 positions, so
the backbone's `max_position_embeddings` caps T at (max_position_embeddings + 1) // (N + 1)
(`max_frames`); longer inputs are refused.

Folder format (what a user can write from their own model; nothing is unpickled):
    config.json            {"architecture": "posttrain.HFWorldModel", "num_actions", "tokenizer": {...},
                            "lora_target_modules": [...], "metadata": {...}}
    backbone/              the causal LM's `save_pretrained` folder (config.json + *.safetensors)
    tokenizer.safetensors  the FrameTokenizer's weights (its config is config.json's "tokenizer")
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from posttrain.envs3d.jobs import match_umask
from posttrain.kernels import sample, selective_log_softmax

from .tokenizer import FrameTokenizer, TokenizerConfig
from .world_model import (
    CONFIG_FILE,
    RolloutOutput,
    check_targets,
    forced_score_by_prefix,
    read_model_config,
    read_safetensors,
)

ARCHITECTURE = "posttrain.HFWorldModel"
BACKBONE_DIR = "backbone"
TOKENIZER_FILE = "tokenizer.safetensors"
DEFAULT_NUM_ACTIONS = 35
"""envs3d's discrete action count (the built-in model's too), so the same episodes drive both."""


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" / "Writing model shards" bars from transformers while we save or load (the
    CLI prints one line per model); the caller's setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def lm_vocab_size(frame_vocab: int, num_actions: int) -> int:
    """Ids a backbone must embed: frame codes, the actions and the null action."""
    return frame_vocab + num_actions + 1


def llama_backbone(vocab_size: int, layers: int, width: int, heads: int, max_positions: int):
    """A fresh, tiny-to-small `LlamaForCausalLM` (MLP 4x width, untied head, no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if width % heads or (width // heads) % 2:
        raise ValueError(f"width={width} must split into {heads} heads of even size (rotary embeddings)")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


class HFWorldModel(nn.Module):
    """A frozen FrameTokenizer + a transformers causal LM over [frame][action][frame]... tokens."""

    frozen_modules = ("tokenizer",)
    """Rewards and reports decode with the tokenizer, so a full fine-tune leaves it alone."""

    def __init__(self, backbone: nn.Module, tokenizer: FrameTokenizer, num_actions: int = DEFAULT_NUM_ACTIONS,
                 lora_target_modules: list[str] | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.num_actions = num_actions
        self.lora_target_modules = list(lora_target_modules or ["q_proj", "v_proj"])
        """Llama's attention projections by default; other backbones name theirs (GPT-2: c_attn)."""
        self.metadata: dict = {}
        needed = lm_vocab_size(self.vocab_size, num_actions)
        embedded = backbone.get_input_embeddings().num_embeddings
        if embedded < needed:
            raise ValueError(f"the backbone embeds {embedded} ids but frame codes + actions + null action "
                             f"need {needed} ({self.vocab_size} + {num_actions} + 1)")

    # --- protocol ---------------------------------------------------------------------------
    @property
    def tokens_per_frame(self) -> int:
        return self.tokenizer.config.tokens_per_frame

    @property
    def vocab_size(self) -> int:
        """Frame codes: what `score`/`rollout` tokens index (the LM's vocabulary is larger)."""
        return self.tokenizer.config.vocab_size

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def max_frames(self) -> int:
        """Frames (context + generated) the backbone's position range holds: T*(N+1) - 1 <= max positions."""
        positions = getattr(self.backbone.config, "max_position_embeddings", None)
        return (positions + 1) // (self.tokens_per_frame + 1) if positions else 2 ** 31

    @property
    def token_grid(self) -> tuple[int, int]:
        """The tokenizer's row-major grid (dense credit). Tokens of a frame are sampled in sequence here, so
        a token is also context for the later tokens of its own frame: per-cell credit leaves that out."""
        return self.tokenizer.config.grid, self.tokenizer.config.grid

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(frames)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.decode(tokens)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, num_context: int, temperature: float = 1.0,
                targets: torch.Tensor | None = None):
        """`score`, as `forward`: DDP and PEFT wrappers only see calls that go through forward."""
        return self.score(tokens, actions, num_context, temperature, targets)

    def interleave(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, T, N) frame codes + (B, T - 1) actions -> (B, T * (N + 1) - 1) LM ids."""
        batch, frames, _ = tokens.shape
        action_ids = (actions + self.vocab_size).to(tokens.dtype)[:, :, None]  # (B, T-1, 1)
        body = torch.cat([tokens[:, :-1], action_ids], 2).reshape(batch, -1)  # (B, (T-1)*(N+1))
        return torch.cat([body, tokens[:, -1]], 1)

    def score(self, tokens, actions, num_context, temperature=1.0, targets=None):
        """Log-probs (B, T - C, N) of frames C.. under the tempered distribution over frame codes
        (`targets`: see `WorldModel.score`; a frame's tokens are read token by token, so other
        targets cost one pass per frame)."""
        if targets is not None:
            if not 1 <= num_context < tokens.shape[1]:
                raise ValueError(f"num_context={num_context} must be in [1, T={tokens.shape[1]})")
            return forced_score_by_prefix(self, tokens, actions, num_context, temperature,
                                          check_targets(tokens, num_context, targets))
        batch, frames, n = tokens.shape
        if not 1 <= num_context < frames:
            raise ValueError(f"num_context={num_context} must be in [1, T={frames})")
        if actions.shape != (batch, frames - 1):
            raise ValueError(f"actions must be (B, T - 1) = {(batch, frames - 1)}, got {tuple(actions.shape)}")
        self._check_length(frames)
        self._check_actions(actions)
        ids = self.interleave(tokens, actions)  # (B, L)
        # The output at position p predicts id p + 1: frame C's first token is predicted at the
        # action a_{C-1}, i.e. position C*(N+1) - 1. Keep the head's logits only from there on.
        keep = (frames - num_context) * (n + 1) - 1
        logits = self.backbone(input_ids=ids[:, :-1], use_cache=False, logits_to_keep=keep).logits  # (B, keep, V_lm)
        logits = logits[..., : self.vocab_size]  # frame positions: softmax over frame codes only
        logits = torch.cat([logits, logits[:, -1:]], 1)  # a dummy last slot so frames reshape evenly
        logits = logits.reshape(batch, frames - num_context, n + 1, -1)[:, :, :n]  # (B, T-C, N, V)
        # Greedy (T=0) rollouts report log-probs at temperature 1, as `sample` does.
        return selective_log_softmax(logits, tokens[:, num_context:], temperature or 1.0)

    @torch.no_grad()
    def rollout(self, context, actions, horizon, *, temperature=1.0, top_k=None, top_p=None, seeds=None,
                generator=None, decode=True, use_cache=True) -> RolloutOutput:
        """Token-by-token sampling with the backbone's KV cache (`use_cache=False`: recompute the
        whole prefix for every token, the reference the cache is tested against)."""
        batch, num_context, n = context.shape
        needed = num_context + horizon - 1
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be at least 1")
        if actions.dim() != 2 or actions.shape[0] != batch or actions.shape[1] < needed:
            raise ValueError(f"actions must be (B, >= C + horizon - 1) = ({batch}, >= {needed}), "
                             f"got {tuple(actions.shape)}")
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} rollouts")
        actions = actions[:, :needed]
        self._check_length(num_context + horizon)
        self._check_actions(actions)
        device = context.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds] if seeds else None
        # Prefix: the context frames, each followed by its action; the last id is a_{C-1}.
        prefix = self.interleave(torch.cat([context, context[:, -1:]], 1), actions[:, :num_context])
        sequence = prefix[:, : num_context * (n + 1)]  # (B, C*(N+1))
        cache, pending = None, sequence
        # transformers 5.24 renamed `past_key_values` (argument and output) to `cache`; accept both.
        cache_name = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
        tokens, logprobs = [], []
        for step in range(horizon):
            uniform = None
            if generators is not None:
                # One draw of N uniforms per rollout and frame, as the built-in model does, then
                # handed out token by token: seed s replays the same rollout whatever the batch.
                uniform = torch.stack([torch.rand(n, generator=g, device=device) for g in generators])  # (B, N)
            frame, frame_logp = [], []
            for j in range(n):
                if use_cache:
                    out = self.backbone(input_ids=pending, use_cache=True, logits_to_keep=1, **{cache_name: cache})
                    cache = getattr(out, cache_name)
                else:
                    out = self.backbone(input_ids=sequence, use_cache=False, logits_to_keep=1)
                logits = out.logits[:, -1, : self.vocab_size].float()  # (B, V) frame codes only
                drawn = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                               uniform=None if uniform is None else uniform[:, j].contiguous(),
                               generator=generator, return_full_logprobs=True)
                frame.append(drawn.tokens)
                frame_logp.append(drawn.full_logprobs)
                pending = drawn.tokens[:, None]  # (B, 1)
                if j == n - 1 and step < horizon - 1:
                    # The frame's last token and the next action go in together: the action's
                    # output predicts the next frame's first token.
                    pending = torch.cat([pending, (actions[:, num_context + step] + self.vocab_size)[:, None]], 1)
                sequence = torch.cat([sequence, pending], 1)
            tokens.append(torch.stack(frame, 1))
            logprobs.append(torch.stack(frame_logp, 1))
        tokens_t, logprobs_t = torch.stack(tokens, 1), torch.stack(logprobs, 1)  # (B, H, N)
        frames = self.decode(tokens_t) if decode else None
        return RolloutOutput(tokens=tokens_t, logprobs=logprobs_t, frames=frames)

    def _check_length(self, frames: int) -> None:
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames need {frames * (self.tokens_per_frame + 1) - 1} positions; the "
                             f"backbone holds {self.backbone.config.max_position_embeddings} "
                             f"(at most {self.max_frames} frames)")

    def _check_actions(self, actions: torch.Tensor) -> None:
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) > self.num_actions):
            raise ValueError(f"actions must be in [0, {self.num_actions}] ({self.num_actions} = null action), "
                             f"got [{int(actions.min())}, {int(actions.max())}]")

    # --- persistence ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, "num_actions": self.num_actions,
                "tokens_per_frame": self.tokens_per_frame, "frame_vocab_size": self.vocab_size,
                "lora_target_modules": self.lora_target_modules,
                "tokenizer": dataclasses.asdict(self.tokenizer.config)}

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """Write config.json, backbone/ (transformers' safetensors) and tokenizer.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config_dict()
        if metadata or self.metadata:
            config["metadata"] = metadata if metadata is not None else self.metadata
        with _quiet_transformers():
            self.backbone.save_pretrained(str(folder / BACKBONE_DIR), safe_serialization=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.tokenizer.state_dict().items()}
        save_file(state, str(folder / TOKENIZER_FILE), metadata={"architecture": ARCHITECTURE})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        match_umask(folder)
        match_umask(folder / BACKBONE_DIR)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> HFWorldModel:
        """Load a `save_pretrained` folder. Errors name the folder and what is wrong; nothing is unpickled."""
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        config = read_model_config(folder, ARCHITECTURE, (CONFIG_FILE, TOKENIZER_FILE, f"{BACKBONE_DIR}/{CONFIG_FILE}"))
        if not list((folder / BACKBONE_DIR).glob("*.safetensors")):
            raise FileNotFoundError(f"{folder / BACKBONE_DIR} holds no *.safetensors weights "
                                    "(only safetensors are read: pickled .bin files can run code)")
        try:
            tokenizer = FrameTokenizer(TokenizerConfig(**config["tokenizer"]))
            num_actions = int(config.get("num_actions", DEFAULT_NUM_ACTIONS))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{folder / CONFIG_FILE}: bad model config ({exc})") from None
        state = read_safetensors(folder / TOKENIZER_FILE, map_location)
        try:
            tokenizer.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{folder / TOKENIZER_FILE} does not match config.json's tokenizer: "
                             f"{str(exc).splitlines()[0]}") from None
        try:
            # use_safetensors: never fall back to a pickled pytorch_model.bin; float32 as saved.
            with _quiet_transformers():
                backbone = AutoModelForCausalLM.from_pretrained(str(folder / BACKBONE_DIR), use_safetensors=True,
                                                                local_files_only=True, dtype=torch.float32,
                                                                device_map=map_location)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{folder / BACKBONE_DIR} cannot be loaded as a causal LM: "
                             f"{str(exc).splitlines()[0]}") from None
        model = cls(backbone, tokenizer, num_actions, config.get("lora_target_modules"))
        for key, value in (("tokens_per_frame", model.tokens_per_frame), ("frame_vocab_size", model.vocab_size)):
            if key in config and config[key] != value:
                raise ValueError(f"{folder / CONFIG_FILE}: {key}={config[key]} but the tokenizer config gives {value}")
        model.metadata = config.get("metadata", {})
        return model.to(map_location).eval()
