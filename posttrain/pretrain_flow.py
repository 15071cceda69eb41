"""Pre-train a flow-matching world model (`FlowWorldModel`) from scratch on envs3d episodes.

    posttrain run recipes/pretrain_flow_tabletop.yaml
    posttrain run recipes/pretrain_flow_tabletop.yaml --resume     # continue after a stop, exactly

The loop is SFT's (`posttrain.sft`: clips drawn from (seed, step), micro-batches, Accelerate, atomic
checkpoints, exact resume, DDP) on a freshly initialised model: the objective is the flow-matching loss, which
is what a flow model's `forward` returns. Only the model's construction is new here. In latent space (`flow.space:
latent`) the model denoises a frozen copy of `tokenizer_from`'s tokenizer latents, so a token model and a flow
model decode through the same tokenizer and compare on equal terms.

The held-out losses are flow-matching losses at random times (noisy estimates; the base is the untrained
initialisation). Rollout quality is `posttrain eval --model RUN/model` (see models/flow/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import sft
from posttrain.adapters import LoraSettings
from posttrain.data import EpisodeDataConfig
from posttrain.models.flow import FlowConfig, FlowWorldModel

LABEL = "fresh FlowWorldModel"


@dataclass
class FlowPretrainConfig(sft.SFTConfig):
    """A flow model's pre-training recipe: SFT's fields (data, extra_data, clips, train, eval) plus the model."""

    method: str = "pretrain_flow"
    """Recipe kind (fixed)."""
    out: str = "runs/pretrain_flow"
    """Run folder (metrics.jsonl, checkpoints/, model/ with mean_frame.png)."""
    model: str = LABEL
    """Fixed: the model is built from `flow` (and `tokenizer_from`), not loaded."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    """The model's architecture and sampler (`space`, widths, context frames, sampling steps...)."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=False))
    """Off (fixed): pre-training trains the whole denoiser."""
    tokenizer_from: str = "default"
    """flow.space latent: the token world model whose frozen tokenizer defines the latent space ('default' or a
    model folder); its weights are copied into the flow model's checkpoint."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model != LABEL:
            raise ValueError(f"model={self.model!r}: pretrain_flow builds its model from `flow`; to train an existing "
                             f"flow model further use method: sft with model: FOLDER")
        if self.lora.enabled:
            raise ValueError("lora.enabled: pre-training trains the whole denoiser; LoRA is for post-training (sft)")
        if self.flow.space == "pixels" and self.flow.tokenizer:
            raise ValueError("flow.tokenizer is for space: latent (it comes from tokenizer_from); remove it")

    def evaluates_on_eval_data(self) -> bool:
        return True


def build_model(config: FlowPretrainConfig) -> FlowWorldModel:
    """The untrained model, a pure function of the recipe's `flow`, `tokenizer_from` and `seed`."""
    torch.manual_seed(config.seed)
    if config.flow.space == "latent":
        from posttrain.models import TokenWorldModel, load_model

        source = load_model(config.tokenizer_from)
        if not isinstance(source, TokenWorldModel):
            raise ValueError(f"tokenizer_from={config.tokenizer_from}: a latent flow model takes the FSQ tokenizer of "
                             f"a built-in token world model, not {type(source).__name__}")
        return FlowWorldModel.latent(source.tokenizer, config.flow)
    return FlowWorldModel(config.flow)


def mean_frame(sections: list[EpisodeDataConfig], rows: int = 256) -> torch.Tensor:
    """(H, W, 3) uint8 mean of every frame of the datasets, read `rows` episodes at a time."""
    from datasets import load_from_disk

    from posttrain.data import dataset_path

    total, count = None, 0
    for data in sections:
        dataset = load_from_disk(str(dataset_path(data, progress=False)))
        for start in range(0, len(dataset), rows):
            part = dataset.select(range(start, min(start + rows, len(dataset))))
            frames = part.with_format("torch", columns=["frames"], dtype=torch.uint8)[:]["frames"]
            flat = frames.reshape(-1, *frames.shape[-3:]).double()
            total = flat.sum(0) if total is None else total + flat.sum(0)
            count += len(flat)
    return (total / count).round().clamp(0, 255).to(torch.uint8)


def run(config: FlowPretrainConfig) -> Path:
    out = sft.run(config, initial_model=build_model(config), method="pretrain_flow")
    from PIL import Image

    from posttrain.evaluate import MEAN_FRAME_FILE

    folder = Path(out) / "model"
    if folder.is_dir():  # the main process's save (other ranks have none)
        image = mean_frame([config.data, *config.extra_data])
        Image.fromarray(image.numpy()).save(folder / MEAN_FRAME_FILE)
        print(f"saved {folder} (with {MEAN_FRAME_FILE}); evaluate it with: posttrain eval --model {folder}")
    return Path(out)
