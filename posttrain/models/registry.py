"""Load a world model by name (`default`, the embedded base) or by folder path, dispatching on the
folder's config.json "architecture": posttrain.TokenWorldModel, posttrain.HFWorldModel, or one a user
registered (`register_architecture`, or an entry point in the `posttrain.world_models` group, so that
`posttrain run`, `eval` and `play` load it without code changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.envs3d.jobs import read_json_object

from .hf_world_model import DEFAULT_NUM_ACTIONS, HFWorldModel, llama_backbone, lm_vocab_size
from .tokenizer import FrameTokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
"""The embedded base model, shipped with the package (see its README.md for how it was made)."""


FLOW_MODEL_DIR = Path(__file__).resolve().parent.parent / "flow_model"
"""The embedded flow-matching base model (`--model flow`; see its README.md)."""

BUILTIN_MODELS = {"default": (DEFAULT_MODEL_DIR, "recipes/pretrain_tabletop.yaml"),
                  "flow": (FLOW_MODEL_DIR, "recipes/pretrain_flow_tabletop.yaml")}
"""Names `--model` takes besides folders: (the shipped folder, the recipe that rebuilds it)."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) in BUILTIN_MODELS:
        folder, recipe = BUILTIN_MODELS[str(name_or_path)]
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the embedded {name_or_path!r} model is missing from {folder}; rebuild it with "
                                    f"`posttrain run {recipe}`")
        return folder
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(name_or_path)!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}) "
                                f"nor an existing folder")
    return path


def model_architecture(folder: Path) -> str | None:
    """config.json's "architecture"; None without a config.json (the loader then names what is missing)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    return read_json_object(path).get("architecture")


ENTRY_POINT_GROUP = "posttrain.world_models"
"""Entry-point group a package uses to register its architecture: `name = "module:loader"`."""

_ARCHITECTURES: dict[str, Callable[[Path, str], Any]] = {}


def register_architecture(name: str, loader: Callable[[Path, str], Any]) -> None:
    """Let `load_model` (hence every recipe's `model=`, `posttrain eval --model`, `posttrain play`) load a
    folder whose config.json says `"architecture": name`, as `loader(folder, map_location)`. The model it
    returns must follow the `WorldModel` protocol (docs/models.md, "Bring your own world model"). From the CLI,
    register through an entry point instead: in your package's pyproject.toml,
    `[project.entry-points."posttrain.world_models"] my_arch = "my_package.world:load"`."""
    _ARCHITECTURES[name] = loader


def _registered_loader(name: str) -> Callable[[Path, str], Any] | None:
    if name not in _ARCHITECTURES:
        from importlib.metadata import entry_points

        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name == name:
                _ARCHITECTURES[name] = point.load()
                break
    return _ARCHITECTURES.get(name)


def load_model(name_or_path: str | Path = "default", map_location: str = "cpu"):
    """A world model from 'default' or a `save_pretrained` folder of a built-in or registered architecture."""
    from .flow import ARCHITECTURE as FLOW_ARCHITECTURE
    from .hf_world_model import ARCHITECTURE as HF_ARCHITECTURE
    from .world_model import ARCHITECTURE as TOKEN_ARCHITECTURE
    from .world_model import TokenWorldModel

    folder = resolve_model_path(name_or_path)
    architecture = model_architecture(folder)
    if architecture == HF_ARCHITECTURE:
        return HFWorldModel.from_pretrained(folder, map_location)
    if architecture == FLOW_ARCHITECTURE:
        from .flow import FlowWorldModel

        return FlowWorldModel.from_pretrained(folder, map_location)
    if architecture not in (None, TOKEN_ARCHITECTURE):
        loader = _registered_loader(architecture)
        if loader is None:
            raise ValueError(f"{folder / 'config.json'}: unknown architecture {architecture!r}; built in: "
                             f"{TOKEN_ARCHITECTURE!r}, {HF_ARCHITECTURE!r}, {FLOW_ARCHITECTURE!r}. Register yours with "
                             f"posttrain.models.register_architecture or an entry point in the "
                             f"{ENTRY_POINT_GROUP!r} group")
        return loader(folder, map_location)
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
