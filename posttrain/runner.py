"""`posttrain run RECIPE.yaml [key.sub=value ...]`: load a recipe into its typed config and run it.

The recipe's `method` key picks the config dataclass and the loop:
pretrain, pretrain_flow, sft, forcing, dpo, grpo, reward_model, adapt_tokenizer.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from posttrain.config import RecipeError, from_dict, load_recipe

METHODS = {
    "pretrain": ("posttrain.pretrain", "PretrainConfig"),
    "grpo": ("posttrain.grpo", "GRPOConfig"),
    "dpo": ("posttrain.dpo", "DPOConfig"),
    "sft": ("posttrain.sft", "SFTConfig"),
    "pretrain_flow": ("posttrain.pretrain_flow", "FlowPretrainConfig"),
    "forcing": ("posttrain.forcing", "ForcingConfig"),
    "reward_model": ("posttrain.reward_model_training", "RewardModelRecipe"),
    "adapt_tokenizer": ("posttrain.adapt_tokenizer", "AdaptTokenizerConfig"),
}


def config_class(method: str):
    if method not in METHODS:
        import difflib

        near = difflib.get_close_matches(str(method), METHODS, n=1)
        raise RecipeError(f"unknown method {method!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                          f"; choose one of {sorted(METHODS)}"))
    module_name, class_name = METHODS[method]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def build_config(path: str | Path, overrides: list[str] | None = None):
    """(module, typed config) for a recipe file plus overrides."""
    data = load_recipe(path, overrides)
    if "method" not in data:
        raise RecipeError(f"{path}: recipe has no `method` key (one of {sorted(METHODS)})")
    module, cls = config_class(data["method"])
    return module, from_dict(cls, data)


def run_recipe(path: str | Path, overrides: list[str] | None = None, resume: bool = False,
               overwrite: bool = False):
    module, config = build_config(path, overrides)
    for flag, wanted in (("resume", resume), ("overwrite", overwrite)):
        if wanted:
            if not hasattr(config, flag):
                raise RecipeError(f"method {config.method!r} does not support --{flag}")
            setattr(config, flag, True)
    return module.run(config)
