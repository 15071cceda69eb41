"""Pre-train the base world model (tokenizer, then dynamics) on envs3d episodes with teacher forcing.

    posttrain run recipes/pretrain_tabletop.yaml [tokenizer.steps=100 ...]

This is how the embedded default model was made. The dynamics model is trained only
with teacher forcing on short clips, like most pre-trained world models: good at
one-step prediction, drifting over long rollouts (exposure bias) - the gap post-training
is for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from posttrain.data import EpisodeDataConfig, load_episodes
from posttrain.envs3d.jobs import fault_point
from posttrain.logging_utils import MetricsWriter, progress_bar
from posttrain.models import (
    DynamicsConfig,
    DynamicsTransformer,
    FrameTokenizer,
    TokenizerConfig,
    TokenWorldModel,
)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags in /proc/cpuinfo (or in `cpuinfo`'s text); empty where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX): where it does, bf16 autocast
    made the tokenizer ~8x faster than fp32; where it does not (AVX2 only), oneDNN emulates bf16 and a step was
    18.6x (dynamics) and 13.9x (tokenizer) slower than fp32 (benchmarks/bench_bf16.py on an AVX2 AMD EPYC).
    Linux only (reads /proc/cpuinfo); elsewhere False, the safe choice."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def check_bf16(value: bool | str) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise ValueError(f"bf16={value!r}: expected true, false or auto")


def use_bf16(value: bool | str) -> bool:
    """The recipe's `bf16` resolved on this machine."""
    return native_bf16() if value == "auto" else bool(value)


@dataclass
class TokenizerTraining:
    """How the FSQ tokenizer is trained."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer architecture."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 32
    """Frames per step."""
    lr: float = 2e-3
    """Peak learning rate (linear warm-up, cosine decay to 5%)."""
    warmup: int = 100
    """Warm-up steps."""
    grad_clip: float = 1.0
    """Max gradient norm (16x16 grids diverged at constant lr without it)."""
    bf16: bool | str = "auto"
    """bf16 autocast for the convolutions (FSQ stays fp32): true, false, or "auto" (on where the CPU has native
    bf16 dot products; see `native_bf16`)."""
    object_weight: float = 4.0
    """Extra loss weight on object pixels (from the segmentation): whole-frame MSE is dominated by
    floor and walls, and an unweighted tokenizer draws small objects in the floor's grey."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("steps", "batch_size", "lr", "grad_clip"), non_negative=("warmup", "object_weight"))
        check_bf16(self.bf16)


@dataclass
class DynamicsTraining:
    """How the dynamics transformer is trained (teacher forcing)."""

    model: DynamicsConfig = field(default_factory=DynamicsConfig)
    """Transformer shape; vocab_size and tokens_per_frame are taken from the tokenizer."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 16
    """Clips per step."""
    clip_frames: int = 8
    """Frames per training clip (the loss covers frames 1..clip_frames-1)."""
    lr: float = 1e-3
    """Peak learning rate (linear warm-up, cosine decay to 5%)."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    bf16: bool | str = "auto"
    """bf16 autocast for matmuls (logits and loss in fp32): true, false, or "auto" (see `native_bf16`)."""
    checkpoint_every: int = 250
    """Steps between checkpoints of this stage in out/checkpoints/ (weights, AdamW state, the clip sampler's
    state): `posttrain run ... --resume` continues from the latest one exactly. 0: none."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("steps", "batch_size", "lr", "grad_clip"),
                non_negative=("warmup", "weight_decay", "checkpoint_every"))
        check_bf16(self.bf16)
        if self.clip_frames < 2:
            raise ValueError(f"clip_frames={self.clip_frames} must be at least 2 (one context, one target)")


@dataclass
class PretrainConfig:
    """Pre-training recipe for the base world model."""

    method: str = "pretrain"
    """Recipe kind (fixed)."""
    out: str = "runs/pretrain"
    """Run folder: metrics.jsonl and model/ (a save_pretrained folder)."""
    seed: int = 0
    """Seed for initialisation and batch sampling."""
    data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="0:600"))
    """Training episodes."""
    extra_data: list[EpisodeDataConfig] = field(default_factory=list)
    """More training episodes, typically with other scene settings (more objects, other floors,
    mesh objects), so that moderately shifted scenes stay in range."""
    eval_data: EpisodeDataConfig = field(default_factory=lambda: EpisodeDataConfig(seeds="900000:900032"))
    """Held-out episodes for the reported metrics."""
    shifted_eval_data: list[EpisodeDataConfig] = field(default_factory=list)
    """Held-out episodes with shifted scene settings, reported beside `eval_data`."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    resume: bool = False
    """Continue the run in `out` (set by `posttrain run --resume`): reuse its finished tokenizer stage and continue
    the dynamics stage from its latest checkpoint."""
    overwrite: bool = False
    """Replace a previous pre-training run in `out` (set by `posttrain run --overwrite`)."""
    init: str = ""
    """Continue pre-training from this model ('default' or a model folder): its tokenizer is kept (no
    tokenizer stage) and the dynamics starts from its weights. Its architecture replaces
    `tokenizer.model` and `dynamics.model`. Empty: train both from scratch."""
    tokenizer_from: str = ""
    """Take the tokenizer of this token world model ('default' or a model folder), frozen: no tokenizer stage, and
    the dynamics trains from scratch with `dynamics.model` on its tokens (to compare dynamics architectures on one
    tokenizer). Its tokenizer replaces `tokenizer.model`. Empty: train the tokenizer too."""
    weights_dtype: str = "float32"
    """How model/model.safetensors stores its weights: float32, or bfloat16 (half the size, so a wider
    model fits the shipped checkpoint's 20 MB). The summary's held-out numbers are measured before saving,
    in float32; `posttrain eval` measures the saved model."""

    def __post_init__(self) -> None:
        from posttrain.config import require
        from posttrain.data import check_held_out

        require(self, positive=("log_every",), non_negative=("threads",))
        from posttrain.models.world_model import weights_torch_dtype

        weights_torch_dtype(self.weights_dtype)  # refuse a bad name now, not after hours of training
        for held_out in [self.eval_data, *self.shifted_eval_data]:
            for train in [self.data, *self.extra_data]:
                check_held_out(train, held_out, "eval_data")
        shortest = min(d.frames for d in [self.data, *self.extra_data])
        if not 2 <= self.dynamics.clip_frames <= shortest:
            # Checked now: the clip sampler would fail only after the tokenizer stage (~35 min at full size).
            raise ValueError(f"dynamics.clip_frames={self.dynamics.clip_frames} must be at least 2 and at most the "
                             f"training episodes' frames ({shortest})")
        if self.init and self.tokenizer_from:
            raise ValueError(f"init={self.init} and tokenizer_from={self.tokenizer_from}: init already keeps its "
                             f"model's tokenizer (and dynamics); set one of them")
        if not (self.init or self.tokenizer_from):  # else the tokenizer comes from a model: run() checks it once loaded
            check_shapes(self)
    tokenizer: TokenizerTraining = field(default_factory=TokenizerTraining)
    """Tokenizer stage."""
    dynamics: DynamicsTraining = field(default_factory=DynamicsTraining)
    """Dynamics stage."""
    log_every: int = 50
    """Steps between metrics.jsonl records."""


def check_shapes(config: PretrainConfig) -> None:
    """Refuse data the tokenizer and dynamics cannot take together, before any episode is generated:
    otherwise the mismatch surfaces as a tensor-shape traceback, some only after the tokenizer stage."""
    import dataclasses

    size = config.tokenizer.model.image_size
    sections = [("data", config.data), *((f"extra_data[{i}]", d) for i, d in enumerate(config.extra_data)),
                ("eval_data", config.eval_data)]
    sections = [(key, data) for key, data in sections if not data.path]  # a dataset folder's frames are its own
    for key, data in sections:  # (a scene section may not set image_size: EpisodeDataConfig refuses it)
        if data.image_size != size:
            raise ValueError(f"{key}.image_size={data.image_size} does not match the tokenizer's "
                             f"{size}x{size} frames (tokenizer.model.image_size); set {key}.image_size={size}")
    for key, data in sections:  # the training episodes are stacked into one tensor
        if key.startswith("extra_data") and not config.data.path and data.frames != config.data.frames:
            raise ValueError(f"{key}.frames={data.frames} differs from data.frames={config.data.frames}: every "
                             f"training episode must have the same number of frames")
    tokenizer = config.tokenizer.model
    try:
        dataclasses.replace(config.dynamics.model, tokens_per_frame=tokenizer.tokens_per_frame,
                            vocab_size=tokenizer.vocab_size)
    except ValueError as exc:
        raise ValueError(f"dynamics.model: {exc} (the tokenizer's {tokenizer.grid}x{tokenizer.grid} grid)") from None


def cosine_schedule(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_tokenizer(frames: torch.Tensor, cfg: TokenizerTraining, generator: torch.Generator,
                    log: MetricsWriter, log_every: int = 50, objects: torch.Tensor | None = None) -> FrameTokenizer:
    """frames: (F, H, W, 3) uint8; objects: (F, H, W) bool object masks for the weighted loss."""
    tokenizer = FrameTokenizer(cfg.model)
    bf16 = use_bf16(cfg.bf16)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, cfg.steps, cfg.warmup))
    with progress_bar(cfg.steps, "tokenizer") as update:
        for step in range(cfg.steps):
            index = torch.randint(len(frames), (cfg.batch_size,), generator=generator)
            batch = frames[index]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                recon, _ = tokenizer(batch)
            squared = ((recon - batch.float() / 255) ** 2).mean(-1)  # (B, H, W)
            loss = squared.mean()
            if objects is not None and cfg.object_weight:
                weight = 1 + cfg.object_weight * objects[index].float()
                objective = (squared * weight).sum() / weight.sum()
            else:
                objective = loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(tokenizer.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            update(loss=loss.item(), psnr=psnr_from_mse(loss.item()))
            if step % log_every == 0 or step == cfg.steps - 1:
                log.write({"stage": "tokenizer", "step": step, "mse": loss.item(), "lr": schedule.get_last_lr()[0]})
    return tokenizer.eval()


@torch.no_grad()
def encode_all(tokenizer: FrameTokenizer, frames: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(E, T, H, W, 3) uint8 -> (E, T, N) token ids."""
    flat = frames.reshape(-1, *frames.shape[2:])
    ids = torch.cat([tokenizer.encode(flat[i: i + batch]) for i in range(0, len(flat), batch)])
    return ids.reshape(*frames.shape[:2], -1)


def sample_clips(tokens, actions, batch_size, clip_frames, generator):
    episodes, frames = tokens.shape[:2]
    index = torch.randint(episodes, (batch_size,), generator=generator)
    start = torch.randint(frames - clip_frames + 1, (batch_size,), generator=generator)
    offsets = start[:, None] + torch.arange(clip_frames)
    clip_tokens = tokens[index[:, None], offsets]  # (B, clip, N)
    clip_actions = actions[index[:, None], offsets[:, :-1]]  # (B, clip-1)
    return clip_tokens, clip_actions


def teacher_forced_loss(dynamics: DynamicsTransformer, tokens: torch.Tensor, actions: torch.Tensor,
                        bf16: bool = False) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = dynamics(tokens[:, :-1], actions)
        logits = dynamics.logits(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def train_dynamics(tokens, actions, cfg: DynamicsTraining, generator, log: MetricsWriter, log_every: int = 50,
                   init: dict[str, torch.Tensor] | None = None, out: Path | None = None, recipe: dict | None = None,
                   resumed: Path | None = None):
    """Teacher-forced next-frame cross-entropy on random clips; `init`: a dynamics state dict to start from.
    With `out`, checkpoints every `cfg.checkpoint_every` steps (stamped with `recipe`); `resumed`: a checkpoint
    folder (`read_dynamics_checkpoint`) to continue from, exactly."""
    dynamics = DynamicsTransformer(cfg.model)
    if init is not None:
        dynamics.load_state_dict(init)
    decay = [p for n, p in dynamics.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in dynamics.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = 0 if resumed is None else load_dynamics_checkpoint(resumed, dynamics, optimizer, generator)
    bf16 = use_bf16(cfg.bf16)
    dynamics.train()
    with progress_bar(cfg.steps - start, "dynamics") as update:
        for step in range(start, cfg.steps):
            lr = cfg.lr * cosine_schedule(step, cfg.steps, cfg.warmup)  # set per step: a resumed run needs no state
            for group in optimizer.param_groups:
                group["lr"] = lr
            clip_tokens, clip_actions = sample_clips(tokens, actions, cfg.batch_size, cfg.clip_frames, generator)
            loss = teacher_forced_loss(dynamics, clip_tokens, clip_actions, bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dynamics.parameters(), cfg.grad_clip)
            optimizer.step()
            update(loss=loss.item())
            if step % log_every == 0 or step == cfg.steps - 1:
                log.write({"stage": "dynamics", "step": step, "loss": loss.item(), "lr": lr})
            done = step + 1
            if out is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_dynamics_checkpoint(out, done, dynamics, optimizer, generator, recipe or {})
                fault_point(f"after_checkpoint:{done}")  # tests: POSTTRAIN_FAULT SIGKILLs here, no timers
    return dynamics.eval()


def tokenizer_digest(tokenizer: FrameTokenizer) -> str:
    """sha256 of the tokenizer's weights: what its token ids (and so the dynamics stage) depend on."""
    digest = hashlib.sha256()
    for name, value in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dynamics_stage_recipe(config: PretrainConfig, tokenizer: FrameTokenizer) -> dict:
    """What the dynamics stage's result depends on (checked against its checkpoint on --resume): the data and
    seed, the tokenizer's weights, the dynamics section (less how often it checkpoints) and the start."""
    from posttrain.config import to_dict

    recipe = tokenizer_stage_recipe(config)
    recipe.pop("tokenizer")  # the weights stand for it (they may come from tokenizer_from or init)
    dynamics = {k: v for k, v in to_dict(config.dynamics).items() if k != "checkpoint_every"}
    return {**recipe, "dynamics": dynamics, "init": config.init, "tokenizer_from": config.tokenizer_from,
            "tokenizer_sha256": tokenizer_digest(tokenizer)}


def save_dynamics_checkpoint(out: Path, step: int, dynamics, optimizer, generator, recipe: dict) -> Path:
    from posttrain.runfolder import optimizer_tensors, write_checkpoint

    tensors, groups = optimizer_tensors(optimizer)
    return write_checkpoint(out, step, {
        "dynamics": (dynamics.state_dict(), {"stage_recipe": json.dumps(recipe, sort_keys=True)}),
        "optimizer": (tensors, {"param_groups": groups, "step": step}),
        "sampler": ({"generator": generator.get_state()}, {})})


def read_dynamics_checkpoint(out: Path, recipe: dict) -> tuple[Path, int] | None:
    """(folder, steps done) of the run's latest dynamics checkpoint, if any; refuses one another recipe wrote."""
    from safetensors import safe_open

    from posttrain.runfolder import latest_checkpoint, resume_changes

    folder = latest_checkpoint(out)
    if folder is None:
        return None
    with safe_open(str(folder / "dynamics.safetensors"), "pt") as handle:
        saved = json.loads((handle.metadata() or {}).get("stage_recipe", "{}"))
    changes = resume_changes(saved, json.loads(json.dumps(recipe)))
    if changes:
        raise ValueError(f"--resume: the dynamics checkpoint {folder} was trained with another recipe "
                         f"({', '.join(changes)}); resume with the original values, or start a new run (out=...)")
    with safe_open(str(folder / "optimizer.safetensors"), "pt") as handle:
        return folder, int(handle.metadata()["step"])


def load_dynamics_checkpoint(folder: Path, dynamics, optimizer, generator) -> int:
    """Restore weights, AdamW state and the clip sampler from `folder`; returns the steps it had done."""
    from posttrain.runfolder import load_optimizer, read_checkpoint_file

    dynamics.load_state_dict(read_checkpoint_file(folder / "dynamics.safetensors")[0])
    tensors, metadata = read_checkpoint_file(folder / "optimizer.safetensors")
    load_optimizer(optimizer, tensors, metadata["param_groups"])
    generator.set_state(read_checkpoint_file(folder / "sampler.safetensors")[0]["generator"])
    return int(metadata["step"])


def cut_metrics(path: Path, done: int) -> None:
    """Before a resumed dynamics stage: drop what the killed run logged after its checkpoint (dynamics steps from
    `done` on, the held-out records and summary that will be written again, a line cut by the kill)."""
    from posttrain.envs3d.jobs import atomic_write_text

    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        stage = record.get("stage")
        if stage in ("tokenizer_eval", "summary") or (stage == "dynamics" and record.get("step", 0) >= done):
            continue
        kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def encoded_tokens(out: Path, tokenizer: FrameTokenizer, frames: torch.Tensor, recipe: dict) -> torch.Tensor:
    """`encode_all(tokenizer, frames)`, kept in out/train_tokens.safetensors: a resumed run (same tokenizer weights
    and data, per `recipe`) reads them back instead of encoding again (~9 min for the recipe's 5,800 episodes
    on one AVX2 core)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / "train_tokens.safetensors"
    key = json.dumps({k: recipe[k] for k in ("data", "extra_data", "tokenizer_sha256")}, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("made_from") == key:
                tokens = handle.get_tensor("tokens")
                if tokens.shape[:2] == frames.shape[:2]:
                    return tokens
    tokens = encode_all(tokenizer, frames)
    partial = path.with_name(path.name + ".partial")
    save_file({"tokens": tokens.contiguous()}, str(partial), metadata={"made_from": key})
    os.replace(partial, path)
    return tokens


def save_mean_frame(frames: torch.Tensor, folder: Path) -> Path:
    """The mean training frame as `mean_frame.png` beside the weights: `posttrain eval`'s mean-image baseline."""
    from PIL import Image

    from posttrain.evaluate import MEAN_FRAME_FILE

    total = torch.zeros(frames.shape[-3:], dtype=torch.float64)
    flat = frames.reshape(-1, *frames.shape[-3:])
    for i in range(0, len(flat), 1024):  # chunked: a float copy of every frame would take GBs
        total += flat[i: i + 1024].double().sum(0)
    mean = (total / len(flat)).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(mean).save(folder / MEAN_FRAME_FILE)
    return folder / MEAN_FRAME_FILE


@torch.no_grad()
def tokenizer_report(tokenizer: FrameTokenizer, frames: torch.Tensor, segmentation: torch.Tensor) -> dict:
    """Held-out reconstruction: PSNR, SSIM and object interior presence (share within 0.2 RGB distance)."""
    from posttrain.rewards.metrics import object_presence, psnr, ssim

    frames = frames.reshape(-1, *frames.shape[-3:])
    segmentation = segmentation.reshape(-1, *segmentation.shape[-2:])
    recon = torch.cat([tokenizer(frames[i: i + 256])[0].clamp(0, 1) for i in range(0, len(frames), 256)])
    truth = frames.float() / 255
    presence = object_presence(recon, truth, segmentation)
    measured = presence[~presence.isnan()]  # empty when no object keeps an interior (tiny frames)
    return {"psnr_db": round(float(psnr(recon, truth).mean()), 2), "ssim": round(float(ssim(recon, truth).mean()), 4),
            "object_interior_within_0.2": round(float(measured.mean()), 4) if len(measured) else None,
            "worst_object_decile": round(float(measured.quantile(0.1)), 4) if len(measured) else None}


def tokenizer_stage_recipe(config: PretrainConfig) -> dict:
    """What the tokenizer stage's result depends on: its section, the training data and the seed (not how
    episodes are made: workers, cache folder)."""
    from posttrain.config import to_dict

    def data(section):
        return {k: v for k, v in to_dict(section).items() if k not in ("workers", "cache_dir")}

    return {"tokenizer": to_dict(config.tokenizer), "data": data(config.data),
            "extra_data": [data(d) for d in config.extra_data], "seed": config.seed}


def load_tokenizer_stage(path: Path, config: PretrainConfig) -> FrameTokenizer:
    """The finished tokenizer stage of an earlier run, if it was trained by this recipe (--resume)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from posttrain.runfolder import resume_changes

    with safe_open(str(path), "pt") as handle:
        saved = (handle.metadata() or {}).get("stage_recipe")
    if saved is not None:
        changes = resume_changes(json.loads(saved), json.loads(json.dumps(tokenizer_stage_recipe(config))))
        if changes:
            raise ValueError(f"--resume: {path} was trained with another recipe ({', '.join(changes)}); resume "
                             f"with the original values, or start a new run (out=...)")
    else:
        print(f"note: {path} records no recipe (written by an earlier version); reusing it unchecked")
    tokenizer = FrameTokenizer(config.tokenizer.model)
    try:
        tokenizer.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ValueError(f"--resume: {path} does not fit tokenizer.model {config.tokenizer.model} (it was trained "
                         f"with another shape); resume with the original tokenizer.model or start a new run "
                         f"(out=...)") from exc
    return tokenizer.eval()


def run(config: PretrainConfig) -> Path:
    from posttrain.config import to_dict
    from posttrain.runfolder import RunLock, input_paths, prepare_run_folder

    out = Path(config.out)
    start_model = None
    # data.path, extra_data[i].path, eval_data.path...: --overwrite must never delete a dataset inside `out`.
    inputs = input_paths(to_dict(config))
    source = config.init or config.tokenizer_from
    key = "init" if config.init else "tokenizer_from"
    if source:
        from posttrain.models.registry import resolve_model_path

        inputs[f"{key} model"] = resolve_model_path(source)
    prepare_run_folder(out, resume=config.resume, overwrite=config.overwrite, inputs=inputs)
    if source:
        from posttrain.models import load_model

        start_model = load_model(source)
        if not isinstance(start_model, TokenWorldModel):
            raise ValueError(f"{key}={source}: pre-training takes the tokenizer of a built-in token world model, "
                             f"not {type(start_model).__name__}")
        config.tokenizer.model = start_model.tokenizer.config
        if config.init:
            config.dynamics.model = start_model.dynamics.config
        check_shapes(config)
    lock = RunLock(out, "pretrain")  # noqa: F841 (held until the process ends)
    if config.threads:
        torch.set_num_threads(config.threads)
    log = MetricsWriter(out / "metrics.jsonl")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.time()
    columns = ("frames", "actions", "segmentation")
    parts = [load_episodes(data, columns=columns) for data in [config.data, *config.extra_data]]
    train = {c: torch.cat([part[c] for part in parts]) for c in columns}
    del parts
    held_out = load_episodes(config.eval_data, columns=columns)
    shifted = [load_episodes(data, columns=columns) for data in config.shifted_eval_data]
    frames = train["frames"]  # (E, T, H, W, 3) uint8
    objects = (train.pop("segmentation") > 0).reshape(-1, *frames.shape[2:4])
    stage_one = out / "tokenizer.safetensors"
    if start_model is not None:
        tokenizer = start_model.tokenizer.eval()
        print(f"continuing from {config.init}: its tokenizer is kept, its dynamics trained further" if config.init
              else f"tokenizer from {config.tokenizer_from} (frozen); training the dynamics from scratch")
    elif config.resume and stage_one.is_file():
        # The tokenizer stage is the first half of the budget: a rerun into the same folder reuses it.
        tokenizer = load_tokenizer_stage(stage_one, config)
        print(f"reusing the trained tokenizer {stage_one}")
    else:
        tokenizer = train_tokenizer(frames.reshape(-1, *frames.shape[2:]), config.tokenizer, generator, log,
                                    config.log_every, objects)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(stage_one),
                  metadata={"stage_recipe": json.dumps(tokenizer_stage_recipe(config), sort_keys=True)})
    del objects
    tokenizer_minutes = (time.time() - started) / 60
    dyn_cfg = config.dynamics
    dyn_cfg.model.vocab_size = tokenizer.config.vocab_size
    dyn_cfg.model.tokens_per_frame = tokenizer.config.tokens_per_frame
    recipe = dynamics_stage_recipe(config, tokenizer)
    resumed = read_dynamics_checkpoint(out, recipe) if config.resume else None
    if resumed is not None:
        cut_metrics(out / "metrics.jsonl", resumed[1])
        print(f"resuming the dynamics stage at step {resumed[1]} of {dyn_cfg.steps} ({resumed[0]})", flush=True)
    tokenizer_eval = {"held_out": tokenizer_report(tokenizer, held_out["frames"], held_out["segmentation"])}
    for data, episodes in zip(config.shifted_eval_data, shifted):
        name = ",".join(f"{k}={v}" for k, v in data.scene.items()) or "default"
        tokenizer_eval[name] = tokenizer_report(tokenizer, episodes["frames"], episodes["segmentation"])
    log.write({"stage": "tokenizer_eval", **tokenizer_eval})
    print(f"tokenizer: {tokenizer_eval}", flush=True)
    tokens = encoded_tokens(out, tokenizer, frames, recipe)
    dynamics = train_dynamics(tokens, train["actions"], dyn_cfg, generator, log, config.log_every,
                              init=start_model.dynamics.state_dict() if config.init else None, out=out,
                              recipe=recipe, resumed=resumed[0] if resumed else None)
    with torch.no_grad():
        eval_tokens = encode_all(tokenizer, held_out["frames"])
        clip = min(dyn_cfg.clip_frames, eval_tokens.shape[1])
        held_out_loss = float(teacher_forced_loss(dynamics, eval_tokens[:, :clip], held_out["actions"][:, :clip - 1]))
    model = TokenWorldModel(tokenizer.config, dynamics.config)
    model.tokenizer.load_state_dict(tokenizer.state_dict())
    model.dynamics.load_state_dict(dynamics.state_dict())
    summary = {
        "tokenizer_psnr_held_out_db": tokenizer_eval["held_out"]["psnr_db"],
        "tokenizer_eval": tokenizer_eval,
        "dynamics_teacher_forced_ce_held_out": round(held_out_loss, 4),
        "train_seeds": [config.data.seeds, *[d.seeds for d in config.extra_data]],
        "eval_seeds": config.eval_data.seeds,
        "tokenizer_minutes": round(tokenizer_minutes, 1),
        "total_minutes": round((time.time() - started) / 60, 1),
        "resumed_dynamics_at_step": resumed[1] if resumed else None,
        "seed": config.seed,
        "init": config.init or None,
        "tokenizer_from": config.tokenizer_from or None,
        "bf16": {"tokenizer": use_bf16(config.tokenizer.bf16), "dynamics": use_bf16(config.dynamics.bf16)},
    }
    log.write({"stage": "summary", **summary})
    model.save_pretrained(out / "model", metadata={"pretrain": summary}, weights_dtype=config.weights_dtype)
    save_mean_frame(frames, out / "model")
    print(f"saved {out / 'model'}: {summary}")
    return out / "model"
