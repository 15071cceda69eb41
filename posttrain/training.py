"""Training plumbing the method loops call: Accelerate set-up, the micro-batched update, reductions
over processes, atomic checkpoints with exact resume, the per-step bookkeeping, and the finish
(adapter or model, held-out report).

    session = setup("grpo", out=..., model=..., seed=0, settings=config.train, lora=config.lora, ...)
    with Steps(session, total=config.steps, resume=config.resume) as steps:
        for step in steps:
            stats = update(session, tokens, actions, loss_fn, num_context=2)
            steps.done(step, metrics)          # non-finite count, metrics.jsonl, checkpoint
    finish(session, steps.history, recipe=to_dict(config))

A method file (grpo.py, dpo.py, sft.py) owns its loop and calls these; nothing here calls a method
back or reads a recipe: every function takes explicit arguments.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.adapters import (
    LoraSettings,
    apply_lora,
    base_reference,
    freeze_for_full_finetune,
    save_adapter,
)
from posttrain.data import EpisodeDataConfig, check_held_out
from posttrain.envs3d.jobs import FAULT_ENV, atomic_write_text, fault_point, replace_folder
from posttrain.evaluate import EvalConfig
from posttrain.logging_utils import MetricsWriter, progress_bar
from posttrain.rollouts import score_in_chunks


@dataclass
class TrainerSettings:
    """Optimisation, precision, micro-batching, checkpointing and logging."""

    lr: float = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps (then constant)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward; the step's batch is accumulated over micro-batches."""
    rollout_batch_size: int = 64
    """Rollouts sampled per forward pass while generating."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: no | bf16 | fp16."""
    checkpoint_every: int = 25
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    log_every: int = 1
    """Steps between metrics.jsonl / TensorBoard records."""
    video_every: int = 25
    """Steps between rollout GIFs in videos/ (0 disables)."""
    tensorboard: bool = True
    """Log to TensorBoard through Accelerate's tracker when tensorboard is installed."""
    eval_at_end: bool = True
    """Evaluate base vs post-trained on held-out seeds and write report/ at the end."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose loss or gradient is not finite (each is skipped and logged) before the run
    stops with an error."""
    max_minutes: float = 0.0
    """Wall-clock budget for the training loop of this process run, in minutes (0: none). When a step
    ends past it, the run checkpoints that step and finishes early (adapter or model, then the report),
    as if `steps` had been that many; metrics.jsonl marks it with `stopped_by_time_budget`. Compares
    methods on equal CPU time (benchmarks/bench_methods.py)."""

    def __post_init__(self) -> None:
        from posttrain.config import require

        require(self, positive=("lr", "micro_batch_size", "rollout_batch_size", "log_every", "keep_checkpoints",
                                "max_nonfinite_steps"),
                non_negative=("weight_decay", "warmup_steps", "max_grad_norm", "checkpoint_every", "video_every",
                              "threads", "max_minutes"))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; choose no, bf16 or fp16")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the CLI reports it in one line (exit code 1)."""


# --- set-up ---------------------------------------------------------------------------------------
@dataclass
class Session:
    """One training run's accelerator, policy, optimizer and run folder (what `setup` builds)."""

    method: str
    """grpo | dpo | sft | ... (logged, and written into the saved adapter's metadata)."""
    out: Path
    """The run folder."""
    settings: TrainerSettings
    """The recipe's `train:` section."""
    accelerator: object
    """accelerate.Accelerator."""
    model: torch.nn.Module
    """What accelerate.prepare returned (DDP/DeepSpeed engine or the policy): the update calls this."""
    policy: torch.nn.Module
    """The unwrapped policy (a PEFT model under LoRA): rollouts and evaluation use this."""
    world: object
    """The WorldModel inside the policy's wrappers (encode, decode, score, rollout)."""
    reference: torch.nn.Module | None
    """A frozen copy of the base (full fine-tuning, when asked for); None under LoRA, where the reference
    is the policy with its adapter disabled (see rollouts.reference_policy)."""
    optimizer: object
    scheduler: object
    lora: bool
    """Whether the policy trains a LoRA adapter (else: a full fine-tune)."""
    base_name: str
    """The base model's name or folder, as the recipe gave it."""
    base_hash: str
    """sha256 of the base model's weights (recorded in adapters)."""
    deepspeed: bool
    """Running under a DeepSpeed engine (one micro-batch per step; it clips and skips overflow itself)."""
    metrics: MetricsWriter
    """metrics.jsonl (writes on the main process only)."""
    lock: object = None
    """The run folder's RunLock (main process), released by `finish`."""


def check_eval_frames(recipe: dict, eval_at_end: bool) -> None:
    """Refuse, before training, a held-out report that would need more frames than its episodes have (it
    would fail only after the last step). Footage runs evaluate on their own held-out clips: not checked."""
    section = recipe.get("eval") or {}
    data = section.get("data") or {}
    if not eval_at_end or not section or (recipe.get("data") or {}).get("path") or data.get("path"):
        return
    needed = section.get("num_context", 0) + section.get("horizon", 0)
    if data.get("frames") is not None and needed > data["frames"]:
        raise ValueError(f"eval.horizon={section.get('horizon')}: eval.num_context + eval.horizon = {needed} frames, "
                         f"but eval.data.frames={data['frames']}; raise eval.data.frames or lower eval.horizon")


def check_image_sizes(recipe: dict, model_size: int | None, model: str) -> None:
    """Refuse envs3d data whose frame size the model cannot read, naming the recipe key (a dataset folder
    given by `path` is checked when it loads)."""
    if (recipe.get("data") or {}).get("path"):
        return  # footage: its frames are checked when the dataset loads, and it may hold the held-out split too
    sections = {"data": recipe.get("data"), "eval.data": (recipe.get("eval") or {}).get("data")}
    for key, section in sections.items():
        size = (section or {}).get("image_size")
        if model_size and size and not (section or {}).get("path") and size != model_size:
            raise ValueError(f"{key}.image_size={size} does not match the model's {model_size}x{model_size} frames "
                             f"({model}); set {key}.image_size={model_size}")


def setup(method: str, *, out: str | Path, model: str, seed: int, settings: TrainerSettings, lora: LoraSettings,
          recipe: dict, resume: bool = False, overwrite: bool = False, frozen_reference: bool = False,
          initial_model: torch.nn.Module | None = None) -> Session:
    """Accelerator, run folder (refuse to clobber, lock, resume checks), base model + LoRA or full
    fine-tuning, AdamW with linear warm-up, all through accelerate.prepare; config.json written.

    recipe: the whole recipe as a dict (config.json, resume check, adapter metadata; its `path` / `*_path`
    values are inputs the run folder must not overlap); frozen_reference: load a frozen copy of the base as
    the reference under full fine-tuning (under LoRA the reference is the adapter-disabled policy);
    initial_model: train this freshly built model instead of loading `model` (pre-training from scratch, e.g.
    `posttrain.pretrain_flow`; `model` is then only its label, and its hash is that of its initial weights)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    from posttrain.models import load_model, weights_hash
    from posttrain.models.registry import resolve_model_path
    from posttrain.runfolder import RunLock, check_resume_config, input_paths, prepare_run_folder

    if settings.threads:
        torch.set_num_threads(settings.threads)
    check_eval_frames(recipe, settings.eval_at_end)
    out = Path(out)
    use_cpu = not torch.cuda.is_available()
    trackers = "tensorboard" if settings.tensorboard and _has_tensorboard() else None
    acc = Accelerator(
        cpu=use_cpu, mixed_precision=settings.mixed_precision, log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        # gloo: DeepSpeed on CPU needs an explicit process group backend (STACK-NOTES.md).
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if use_cpu and _launched_distributed() else [],
    )
    lock = None
    if acc.is_main_process:
        # Before anything is written: refuse to clobber, then hold the folder for the run's life.
        inputs = {**({} if initial_model is not None else {"model folder": resolve_model_path(model)}),
                  **input_paths(recipe)}
        prepare_run_folder(out, resume=resume, overwrite=overwrite, inputs=inputs)
        lock = RunLock(out, method)
        if resume:
            check_resume_config(out, recipe)
    acc.wait_for_everyone()
    plugin = acc.state.deepspeed_plugin
    if plugin is not None:
        # No dataloader goes through prepare(), so DeepSpeed cannot infer its batch size.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        plugin.deepspeed_config["gradient_accumulation_steps"] = 1
        plugin.deepspeed_config["gradient_clipping"] = settings.max_grad_norm or 0.0
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and not checkpoint:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if resume and isinstance(recipe.get("steps"), int):
        done = int(checkpoint.name.rsplit("-", 1)[-1]) + 1  # step-000003 holds steps 0..3
        if recipe["steps"] < done:
            raise ValueError(f"--resume: {out} holds a checkpoint after {done} steps; steps={recipe['steps']} is "
                             f"fewer, and trained weights cannot be un-trained. Give steps >= {done}, or start a "
                             f"new run (out=...)")
    if initial_model is not None:
        import copy

        base_hash, policy = state_hash(initial_model), initial_model
        reference = copy.deepcopy(initial_model).eval()  # the base the held-out losses compare against
    else:
        base_hash, policy, reference = weights_hash(resolve_model_path(model)), load_model(model), None
    check_image_sizes(recipe, getattr(policy, "image_size", None), model)
    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random: same seed, same run
    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    if lora.enabled:  # under LoRA the adapter-disabled policy is the reference
        policy, reference = apply_lora(policy, lora), None
    else:
        if reference is None and frozen_reference:
            reference = load_model(model).eval()
        freeze_for_full_finetune(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = settings.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    wrapped, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    # accelerate's unwrap_model imports deepspeed whenever it is installed, and deepspeed's import prints
    # "Setting accelerator to CPU" on every run; only a DeepSpeed engine needs it, DDP is one .module away.
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    policy = acc.unwrap_model(wrapped) if plugin is not None else wrapped.module if ddp else wrapped
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(recipe, indent=2))
    return Session(method=method, out=out, settings=settings, accelerator=acc, model=wrapped, policy=policy,
                   world=unwrap(policy), reference=reference, optimizer=optimizer, scheduler=scheduler,
                   lora=lora.enabled, base_name=model, base_hash=base_hash, deepspeed=plugin is not None,
                   metrics=MetricsWriter(out / "metrics.jsonl", enabled=acc.is_main_process), lock=lock)


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes, in order): an in-memory model's
    identity, as `weights_hash` is a saved one's."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def unwrap(model):
    """The world model inside PEFT wrappers (what trainers see through the WorldModel protocol)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def frozen_base(session: Session):
    """The base model to compare against or score the reference with: None under LoRA (the
    adapter-disabled policy is the base, see rollouts.reference_policy), else the frozen reference
    copy, loaded now if the run has none."""
    if session.lora:
        return None
    if session.reference is None:
        from posttrain.models import load_model

        session.reference = load_model(session.base_name).eval()
    return session.reference


# --- the update -----------------------------------------------------------------------------------
def micro_batch_rows(session: Session, rows: int, align: int = 1) -> int:
    """Rows per micro-batch: micro_batch_size rounded down to a multiple of `align` (at least `align`);
    all rows at once under DeepSpeed, which steps its engine inside every backward."""
    if session.deepspeed:
        return rows
    return max(align, session.settings.micro_batch_size // align * align)


def update(session: Session, tokens: torch.Tensor, actions: torch.Tensor, loss_fn, *, num_context: int,
           temperature: float = 1.0, align: int = 1, targets: torch.Tensor | None = None,
           forward_kwargs: dict | None = None) -> dict:
    """One optimizer step accumulated over micro-batches. `loss_fn(new_logp, index) -> (loss, stats)`
    must return micro-batch losses normalised by the GLOBAL batch, so their sum is the batch loss.
    new_logp: (b, T - num_context, N) log-probs of the micro-batch rows `index` at `temperature`.
    `align`: micro-batches hold a multiple of this many rows (DPO: 2, so a chosen/rejected pair
    is never split across micro-batches). `targets` (B, T - num_context, N): frames scored in place of
    the inputs' own (`WorldModel.score(..., targets=)`; simulator-forcing). `forward_kwargs`: more keyword
    arguments for the model's forward (SFT on a flow model: `objective`, and per-row `noise_seeds`); tensor
    values are per row and are split into micro-batches with the rows. Returns the summed stats,
    grad_norm and skipped_nonfinite (1 when a non-finite loss or gradient made the step a no-op)."""
    acc, model = session.accelerator, session.model
    model.train()
    chunk = micro_batch_rows(session, len(tokens), align)
    starts = list(range(0, len(tokens), chunk))
    totals: dict = {}
    for i, start in enumerate(starts):
        index = torch.arange(start, min(start + chunk, len(tokens)))
        sync = i == len(starts) - 1
        context = acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()
        with context:
            extra = {k: v[index] if torch.is_tensor(v) else v for k, v in (forward_kwargs or {}).items()}
            if targets is not None:
                extra["targets"] = targets[index]
            new_logp = model(tokens[index], actions[index], num_context, temperature, **extra)
            loss, stats = loss_fn(new_logp, index)
            # DDP averages gradients over processes; scale so the sum matches one process.
            acc.backward(loss * acc.num_processes)
            stats = {**stats, "loss_sum": float(loss.detach())}
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    if not session.deepspeed:  # DeepSpeed clips with its own config and skips overflowing steps itself
        # The global norm (after DDP's all-reduce the gradients are identical on every rank, so
        # every rank takes the same decision below); inf clipping only measures it.
        clip = session.settings.max_grad_norm or float("inf")
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), clip))
        totals["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm) or not all(math.isfinite(float(v)) for v in totals.values()):
            # A non-finite loss or gradient would poison the weights (and Adam's moments) for good.
            session.optimizer.zero_grad(set_to_none=True)
            totals["skipped_nonfinite"] = 1
            return totals
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    totals["skipped_nonfinite"] = 0
    return totals


@torch.no_grad()
def policy_logprobs(session: Session, tokens: torch.Tensor, actions: torch.Tensor, *, num_context: int,
                    temperature: float = 1.0, align: int = 1) -> torch.Tensor:
    """Log-probs (B, L) of `tokens` under the current policy, computed exactly as `update` will
    (same wrapped model, same autocast, same micro-batches). Under mixed precision the sampler's
    fp32 log-probs differ from the update's bf16 ones by up to ~7e-2, so the first ratio would not
    be 1; these are the old log-probs to use then."""
    chunk = micro_batch_rows(session, len(tokens), align)
    return score_in_chunks(session.model, tokens, actions, num_context, temperature, chunk=chunk)


# --- reductions over processes --------------------------------------------------------------------
def reduce_sum(accelerator, value: float) -> float:
    """The sum of `value` over processes (every process gets it)."""
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum"))


def reduce_mean(accelerator, value: float) -> float:
    """The mean of `value` over processes."""
    return reduce_sum(accelerator, value) / accelerator.num_processes


def global_count(accelerator, mask: torch.Tensor) -> int:
    """True entries of `mask` summed over processes (at least 1: it is a loss normaliser)."""
    return max(int(round(reduce_sum(accelerator, float(mask.sum())))), 1)


def reward_metrics(accelerator, scores, valid: torch.Tensor) -> dict:
    """reward_mean/std, reward/<name>_mean/std over the valid samples of every process, failed_samples."""
    gather = (lambda t: accelerator.gather(t.float())) if accelerator.num_processes > 1 else (lambda t: t)
    metrics = {}
    total = gather(scores.total[valid])
    metrics["reward_mean"] = float(total.mean()) if total.numel() else float("nan")
    metrics["reward_std"] = float(total.std()) if total.numel() > 1 else 0.0
    for name, values in scores.components.items():
        values = gather(values[valid])
        metrics[f"reward/{name}_mean"] = float(values.mean()) if values.numel() else float("nan")
        metrics[f"reward/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
    metrics["failed_samples"] = int(round(reduce_sum(accelerator, float((~valid).sum()))))
    return metrics


@dataclass
class RunConfig:
    """What every post-training recipe (grpo, dpo, sft, forcing) shares: the model, the run folder, the
    seed, the training data, LoRA or full, the trainer settings, the held-out report and resume/overwrite.
    A method's config subclasses it, redeclares `method`, `out` and `data` with its own defaults (and
    docstrings), and adds its own fields after these."""

    method: str = ""
    """Recipe kind (fixed)."""
    out: str = "runs/run"
    """Run folder (metrics.jsonl, checkpoints/, adapter/ or model/, report/)."""
    model: str = "default"
    """Base model: 'default' (embedded), a save_pretrained folder, or a transformers world-model folder."""
    seed: int = 0
    """Seed for initialisation, the data order and every rollout's sampling seed."""
    data: EpisodeDataConfig = field(default_factory=EpisodeDataConfig)
    """Training episodes."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (enabled=False: full fine-tuning of the dynamics transformer; methods with a reference
    model then keep a frozen copy of the base)."""
    train: TrainerSettings = field(default_factory=TrainerSettings)
    """Optimiser, precision, micro-batching, checkpoints and logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of base vs post-trained at the end (temperatures in `eval_temperatures`)."""
    eval_temperatures: list[float] = field(default_factory=lambda: [1.0, 0.0])
    """Temperatures for the final base-vs-post-trained comparison (0 = greedy)."""
    resume: bool = False
    """Continue from the newest checkpoint in `out` (set by `posttrain run --resume`)."""
    overwrite: bool = False
    """Replace a finished or failed run in `out` (set by `posttrain run --overwrite`; only a folder
    holding this toolkit's run marker is ever deleted)."""

    def __post_init__(self) -> None:
        if any(not t >= 0 for t in self.eval_temperatures):
            raise ValueError(f"eval_temperatures={self.eval_temperatures} must be >= 0")
        if self.evaluates_on_eval_data():
            check_held_out(self.data, self.eval.data)

    def evaluates_on_eval_data(self) -> bool:
        """Whether `eval.data` is the held-out set (then it may not overlap `data`)."""
        return True


# --- checkpoints ----------------------------------------------------------------------------------
def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, if it is there."""
    pointer = Path(out) / "checkpoints" / "latest"
    if pointer.is_file():
        path = Path(out) / "checkpoints" / pointer.read_text().strip()
        if path.is_dir():
            return path
    return None


def save_checkpoint(session: Session, step: int, history: list) -> Path:
    """accelerate.save_state into a staging folder, then rename it into place, then move the `latest`
    pointer (each a single rename: a kill at any point leaves the previous checkpoint usable)."""
    acc = session.accelerator
    root = session.out / "checkpoints"
    final = root / f"step-{step:06d}"
    staging = root / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    _hold_other_ranks(acc, staging)
    acc.save_state(str(staging))  # every rank writes its own files (RNG state; DeepSpeed: its shards)
    # Every rank's files are in before rank 0 renames the folder: without this barrier a rank still
    # writing (a loaded machine) found its folder gone ("Parent directory .tmp-step-000000 does not exist")
    # and died, and rank 0 then failed in the next barrier with gloo's "Connection closed by peer".
    _mark_commit_barrier(acc, staging)
    acc.wait_for_everyone()
    if acc.is_main_process:
        (staging / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
        replace_folder(staging, final)
        _commit_marker(staging).unlink(missing_ok=True)
        atomic_write_text(root / "latest", final.name)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[: -max(1, session.settings.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    # Deterministic fault injection for tests: POSTTRAIN_FAULT=after_checkpoint:3 SIGKILLs the process
    # right after checkpoint step-000003 is committed (no timers, no polling).
    fault_point(f"after_checkpoint:{step}")
    return final


# Deterministic fault injection for the checkpoint-ordering test (tests/test_distributed.py):
# POSTTRAIN_FAULT=slow_rank_checkpoint makes every rank but 0 start writing its checkpoint files only once
# rank 0 has either reached the barrier that waits for them (correct) or renamed the folder (the bug this
# barrier fixed): a slow rank on demand, decided by events, not by timing. For DDP runs only: DeepSpeed's
# save_state has collectives of its own, which a held rank would block.
_SLOW_RANK_FAULT = "slow_rank_checkpoint"


def _commit_marker(staging: Path) -> Path:
    return staging.parent / f"{staging.name}.rank0-waits"


def _hold_other_ranks(acc, staging: Path) -> None:
    if os.environ.get(FAULT_ENV) != _SLOW_RANK_FAULT or acc.is_main_process:
        return
    marker, deadline = _commit_marker(staging), time.monotonic() + 600
    while staging.is_dir() and not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{_SLOW_RANK_FAULT}: rank 0 neither waited for this rank nor renamed {staging}")
        time.sleep(0.01)


def _mark_commit_barrier(acc, staging: Path) -> None:
    if os.environ.get(FAULT_ENV) == _SLOW_RANK_FAULT and acc.is_main_process:
        _commit_marker(staging).touch()


def load_checkpoint(session: Session) -> tuple[int, list]:
    """Restore the latest checkpoint (weights, optimizer, scheduler, RNG states); cut metrics.jsonl back to
    its step. Returns (the first step to run, the metrics history so far)."""
    path = latest_checkpoint(session.out)
    session.accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    if session.accelerator.is_main_process:
        from posttrain.runfolder import truncate_metrics

        # Steps logged after the checkpoint are replayed now: drop them so none appears twice.
        dropped = truncate_metrics(session.out / "metrics.jsonl", state["step"])
        if dropped:
            print(f"resume: dropped {dropped} metrics.jsonl records logged after step {state['step']}")
    return state["step"] + 1, state["history"]


# --- the per-step bookkeeping ---------------------------------------------------------------------
class Steps:
    """The bookkeeping a method's loop calls once per step, so each loop does not repeat it:

        with Steps(session, total=config.steps, resume=config.resume) as steps:
            for step in steps:               # from the checkpoint's next step when resuming
                ...                          # the method's own step
                steps.done(step, metrics)

    `done` adds step/lr/processes to the metrics, counts non-finite steps in a row (raising
    TrainingDiverged at settings.max_nonfinite_steps), writes metrics.jsonl and TensorBoard every
    log_every steps, checkpoints every checkpoint_every steps and at the last, and moves the bar."""

    def __init__(self, session: Session, *, total: int, resume: bool):
        self.session, self.total, self.resume = session, total, resume
        self.start, self.history = 0, []
        self._nonfinite_in_a_row = 0
        self._bar = None
        self._started = time.monotonic()
        self._out_of_time = False

    def __enter__(self) -> Steps:
        acc = self.session.accelerator
        if self.resume:
            self.start, self.history = load_checkpoint(self.session)
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("posttrain", config={"method": self.session.method})
        self._bar = progress_bar(self.total - self.start, self.session.method, enabled=acc.is_main_process)
        self._advance = self._bar.__enter__()
        return self

    def __iter__(self):
        for step in range(self.start, self.total):
            if self._out_of_time:
                return
            yield step

    def _over_budget(self) -> bool:
        """Past settings.max_minutes; decided on the main process and broadcast, so all ranks stop together."""
        budget = self.session.settings.max_minutes
        if not budget:
            return False
        over = time.monotonic() - self._started > budget * 60
        acc = self.session.accelerator
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            flag = torch.tensor([float(over)], device=acc.device)
            over = bool(broadcast(flag, from_process=0).item())
        return over

    def video_due(self, step: int) -> bool:
        """Whether this step saves a rollout GIF (main process, every video_every steps)."""
        every = self.session.settings.video_every
        return bool(every) and self.session.accelerator.is_main_process and step % every == 0

    def done(self, step: int, metrics: dict, force_log: bool = False) -> None:
        """Record step `step`'s metrics (already reduced over processes); may write a checkpoint. `force_log`:
        write this step's record even between log_every steps (it holds something measured only now, e.g.
        SFT's held-out loss every eval_every steps)."""
        session, settings, acc = self.session, self.session.settings, self.session.accelerator
        metrics.update({"step": step, "lr": session.scheduler.get_last_lr()[0], "processes": acc.num_processes})
        if metrics.get("skipped_nonfinite"):
            self._nonfinite_in_a_row += 1
            print(f"step {step}: non-finite loss or gradient (grad_norm={metrics.get('grad_norm')}); "
                  f"update skipped ({self._nonfinite_in_a_row} in a row)")
            if self._nonfinite_in_a_row >= settings.max_nonfinite_steps:
                session.metrics.write(metrics)
                raise TrainingDiverged(
                    f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (last: step "
                    f"{step}); stopped. The last good checkpoint is in {session.out / 'checkpoints'}; lower "
                    f"train.lr or check the rewards, then --resume or start again")
        else:
            self._nonfinite_in_a_row = 0
        self._out_of_time = step < self.total - 1 and self._over_budget()
        last = step == self.total - 1 or self._out_of_time
        if self._out_of_time:
            metrics["stopped_by_time_budget"] = True
            print(f"step {step}: train.max_minutes={settings.max_minutes} reached; checkpointing and finishing")
        self.history.append({k: v for k, v in metrics.items() if k in ("step", "reward_mean", "loss")})
        if step % settings.log_every == 0 or last or force_log:
            session.metrics.write(metrics)
            if acc.log_with:
                acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        # POSTTRAIN_FAULT=after_log:3 SIGKILLs the process right after step 3's metrics are written.
        fault_point(f"after_log:{step}")
        every = settings.checkpoint_every
        if (every and (step + 1) % every == 0) or last:
            save_checkpoint(session, step, self.history)
        self._advance(**{k: metrics[k] for k in ("reward_mean", "loss", "kl") if k in metrics})

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)
        if exc[0] is None:
            acc = self.session.accelerator
            acc.wait_for_everyone()
            if acc.log_with:
                acc.end_training()


# --- the end --------------------------------------------------------------------------------------
def finish(session: Session, history: list, *, recipe: dict, eval_config=None,
           eval_temperatures: tuple[float, ...] | list[float] = (), report_data: dict | None = None) -> Path:
    """Save the adapter (LoRA) or the whole model (full fine-tune) and, with `eval_config` and
    settings.eval_at_end, the held-out base-vs-post-trained report (main process); release the run folder.
    `report_data` gives the report's episodes instead of eval_config.data (footage: see report.write_report)."""
    if session.accelerator.is_main_process:
        if session.lora:
            save_adapter(session.policy, session.out / "adapter", session.base_name, session.base_hash,
                         {"method": session.method, "recipe": recipe})
        else:
            session.world.save_pretrained(session.out / "model", metadata={"method": session.method,
                                                                          "base": base_reference(session.base_name),
                                                                          "base_weights_sha256": session.base_hash})
        if session.settings.eval_at_end and eval_config is not None:
            from posttrain.report import write_report

            write_report(session.policy, frozen_base(session), out=session.out, base_name=session.base_name,
                         eval_config=eval_config, temperatures=eval_temperatures, history=history,
                         **(report_data or {}))
    if session.lock is not None:
        session.lock.release()
    return session.out


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401

        return True
    except ImportError:
        return False
