"""Load a world model by name (`default`, the embedded base) or by folder path, dispatching on the
folder's config.json "architecture" (posttrain.TokenWorldModel or posttrain.HFWorldModel)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .hf_world_model import DEFAULT_NUM_ACTIONS, HFWorldModel, llama_backbone, lm_vocab_size
from .tokenizer import FrameTokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
"""The embedded base model, shipped with the package (see its README.md for how it was made)."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                "rebuild it with `posttrain run recipes/pretrain_tabletop.yaml`"
            )
        return DEFAULT_MODEL_DIR
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(name_or_path)!r} is neither 'default' nor an existing folder")
    return path


def model_architecture(folder: Path) -> str | None:
    """config.json's "architecture"; None without a config.json (the loader then names what is missing)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return config.get("architecture") if isinstance(config, dict) else None


def load_model(name_or_path: str | Path = "default", map_location: str = "cpu"):
    """A world model from 'default' or a `save_pretrained` folder of either built-in architecture."""
    from .hf_world_model import ARCHITECTURE as HF_ARCHITECTURE
    from .world_model import TokenWorldModel

    folder = resolve_model_path(name_or_path)
    if model_architecture(folder) == HF_ARCHITECTURE:
        return HFWorldModel.from_pretrained(folder, map_location)
    # TokenWorldModel's loader names a missing config, bad JSON or an unknown architecture.
    return TokenWorldModel.from_pretrained(folder, map_location)


def init_model(arch: str, layers: int, width: int, heads: int | None, tokenizer: str | Path = "default",
               num_actions: int = DEFAULT_NUM_ACTIONS, max_frames: int = 16, seed: int = 0) -> HFWorldModel:
    """A fresh (untrained) HFWorldModel with the tokenizer of model `tokenizer` ('default': the embedded
    model's). It lives here, not in hf_world_model.py, so that module need not import this one back."""
    if arch != "llama":
        raise ValueError(f"--arch {arch!r}: only 'llama' is built in; for another transformers causal LM "
                         "write its save_pretrained folder into backbone/ (see posttrain/models/hf_world_model.py)")
    if layers < 1 or width < 1 or max_frames < 2:
        raise ValueError(f"--layers {layers}, --width {width} and --max-frames {max_frames} must be positive "
                         "(max frames at least 2)")
    source = load_model(tokenizer)
    if not hasattr(source, "tokenizer") or not isinstance(source.tokenizer, FrameTokenizer):
        raise ValueError(f"--tokenizer {tokenizer}: that model has no posttrain FrameTokenizer to copy")
    frame_tokenizer = FrameTokenizer(source.tokenizer.config)
    frame_tokenizer.load_state_dict(source.tokenizer.state_dict())
    n = frame_tokenizer.config.tokens_per_frame
    torch.manual_seed(seed)
    backbone = llama_backbone(lm_vocab_size(frame_tokenizer.config.vocab_size, num_actions), layers, width,
                              heads or max(1, width // 64), max_positions=max_frames * (n + 1))
    return HFWorldModel(backbone, frame_tokenizer, num_actions).eval()
