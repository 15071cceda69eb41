"""Test-only hook: record the gradients `posttrain.training.update` hands to the optimizer.

Comparing weights after one AdamW step cannot check gradient scaling: Adam divides the update
by the gradient's own RMS, so a constant factor (a dropped `* num_processes`, a per-micro-batch
instead of a global normaliser) leaves the step unchanged; with LoRA B = 0 the first update is
lr * sign(grad). The invariants are therefore checked on gradients:

* `install(records, full_batch=True)` patches `training.update` so that each call appends
  {"step_grads": the gradients after the last micro-batch's backward and BEFORE clipping,
   "full_batch": the gradients of ONE backward of `loss_fn` over the whole local batch}
  to `records` (full_batch only on request);
* `tests/grad_dump_main.py` does the same under `accelerate launch` and saves the first
  update's gradients of each rank to `$POSTTRAIN_GRAD_DUMP/rank<k>.safetensors`.

Gradients are keyed by parameter name (the unwrapped policy's names).
"""

from __future__ import annotations

import torch

from posttrain import training
from posttrain.training import Session


def _trainable(session: Session) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in session.policy.named_parameters() if p.requires_grad]


def full_batch_grads(session: Session, tokens, actions, loss_fn, num_context: int, temperature: float,
                     forward_kwargs: dict | None = None) -> dict:
    """Gradients of one forward/backward of `loss_fn` over every row (no micro-batches, no DDP)."""
    named = _trainable(session)
    session.policy.train()
    new_logp = session.policy(tokens, actions, num_context, temperature, **(forward_kwargs or {}))
    loss, _ = loss_fn(new_logp, torch.arange(len(tokens)))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g.detach().clone() for (name, p), g in zip(named, grads)}


def install(records: list, full_batch: bool = False, patch=None) -> None:
    """Patch `training.update` (through `patch(obj, name, value)`, e.g. pytest's monkeypatch.setattr;
    a plain setattr when None) to append one record per call to `records`."""
    original = training.update

    def update(session, tokens, actions, loss_fn, *, num_context: int, temperature: float = 1.0, align: int = 1,
               forward_kwargs: dict | None = None):
        record = {}
        if full_batch:
            record["full_batch"] = full_batch_grads(session, tokens, actions, loss_fn, num_context, temperature,
                                                    forward_kwargs)
        named = _trainable(session)

        def snapshot():
            if "step_grads" not in record:
                record["step_grads"] = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                                        for name, p in named}

        # Whichever comes first after the backward passes: clipping (if on), else the optimizer step.
        acc, optimizer = session.accelerator, session.optimizer
        clip, step = acc.clip_grad_norm_, optimizer.step

        def clip_first(*args, **kwargs):
            snapshot()
            return clip(*args, **kwargs)

        def step_first(*args, **kwargs):
            snapshot()
            return step(*args, **kwargs)

        saved = [(obj, name, vars(obj).get(name)) for obj, name in ((acc, "clip_grad_norm_"), (optimizer, "step"))]
        acc.clip_grad_norm_, optimizer.step = clip_first, step_first
        try:
            return original(session, tokens, actions, loss_fn, num_context=num_context, temperature=temperature,
                            align=align, forward_kwargs=forward_kwargs)
        finally:
            for obj, name, value in saved:  # back to what the instances had (normally the class methods)
                if value is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)
            records.append(record)

    (patch or setattr)(training, "update", update)
