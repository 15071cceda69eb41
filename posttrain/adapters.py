"""LoRA adapters for world models through PEFT: apply, save with the base model's identity, load, merge.

PEFT records no base model for a custom module (`base_model_name_or_path` is None), so
`save_adapter` writes `posttrain_adapter.json` beside PEFT's files with the base model's
name and weights hash, and `load_adapter` refuses an adapter made for another base, one
without that file (unless forced: `posttrain eval --force-adapter`) and one whose
adapter_config.json no longer matches its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.envs3d.jobs import match_umask, read_json_object

ADAPTER_INFO = "posttrain_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraSettings:
    """LoRA on the dynamics transformer's projections (PEFT)."""

    enabled: bool = True
    """Train a LoRA adapter (False: full fine-tuning of the dynamics transformer)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty: the model's own choice (its `lora_target_modules`, e.g. the dynamics
    transformer's q/k/v/o projections and MLP layers for the built-in model)."""


def apply_lora(model, settings: LoraSettings):
    """Wrap `model` in a PEFT LoRA model; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules) or list(getattr(model, "lora_target_modules", []))
    if not targets:
        raise ValueError(f"{type(model).__name__} names no lora_target_modules; set lora.target_modules in the recipe")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets)
    return get_peft_model(model, config)


def freeze_for_full_finetune(model) -> None:
    """Full fine-tuning trains every parameter except those under the model's `frozen_modules` (for the
    built-in model, the tokenizer: rewards and reports decode with it, so it must not move)."""
    frozen = tuple(f"{prefix}." for prefix in getattr(model, "frozen_modules", ()))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen))


def save_adapter(peft_model, folder: str | Path, base_name: str, base_hash: str, extra: dict | None = None) -> Path:
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    info = {"base_model": base_reference(base_name), "base_weights_sha256": base_hash, **(extra or {})}
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    match_umask(folder)
    return folder


def base_reference(base_name: str) -> str:
    """A base model folder as an absolute path (a relative one would break `adapter export --merge` run from
    another directory); built-in names such as "default" as they are."""
    from posttrain.models.registry import BUILTIN_MODELS

    if base_name in BUILTIN_MODELS or not Path(base_name).is_dir():
        return base_name
    return str(Path(base_name).resolve())


def load_adapter(model, folder: str | Path, base_name: str = "default", merge: bool = False, force: bool = False):
    """Apply a saved adapter to `model` (its base). Errors name both bases when they differ.

    An adapter without posttrain_adapter.json (e.g. trained elsewhere) has no record of its base, so
    it is refused unless `force`: applied to the wrong base it would
    give a silently wrong model.
    """
    from peft import PeftModel

    from posttrain.models import weights_hash
    from posttrain.models.registry import resolve_model_path

    folder = Path(folder)
    config_path, weights = folder / "adapter_config.json", folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no adapter_config.json")
    # Checked here: PEFT would take a folder without weights for a Hub repo id and try to download it.
    if not weights.is_file() and not (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS} (the adapter's weights)")
    config = read_json_object(config_path)
    info_path = folder / ADAPTER_INFO
    if info_path.is_file():
        info = read_json_object(info_path)
        expected = info.get("base_weights_sha256")
        actual = weights_hash(resolve_model_path(base_name))
        if expected and expected != actual:
            raise ValueError(f"adapter {folder} was made for base model {info.get('base_model')!r} "
                             f"(weights sha256 {expected[:12]}), not for {base_name!r} (sha256 {actual[:12]})")
    elif not force:
        raise ValueError(f"adapter {folder} has no {ADAPTER_INFO}, so its base model cannot be checked against "
                         f"{base_name!r}; pass --force-adapter (load_adapter(..., force=True)) to apply it anyway")
    if weights.is_file():
        _check_rank(config_path, config, weights)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except RuntimeError as exc:
        # PEFT's load_state_dict reports every mismatched tensor; the first line says enough.
        if "size mismatch" not in str(exc):
            raise
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ValueError(f"adapter {folder} does not fit base model {base_name!r} "
                         f"(adapter_config.json or the weights were changed?): {detail}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def _check_rank(config_path: Path, config: dict, weights: Path) -> None:
    """Reads every tensor header of `weights` (a truncated or corrupt file is a ValueError naming it) and checks
    that adapter_config.json's `r` is the rank the saved lora_A weights have (an edited r otherwise surfaces
    as a long size-mismatch traceback from PEFT)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as tensors:
            ranks = {key: tensors.get_slice(key).get_shape()[0] for key in tensors.keys() if ".lora_A." in key}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights} cannot be read (truncated or not a safetensors file?): {exc}") from None
    if config.get("rank_pattern"):
        return  # per-module ranks: left to the size-mismatch check in load_adapter
    for key, rank in ranks.items():
        if rank != config.get("r"):
            raise ValueError(f"{config_path}: r={config.get('r')!r}, but {weights.name} holds rank-{rank} "
                             f"weights ({key}); set r back to {rank} or retrain the adapter")
