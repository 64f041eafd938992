"""The meta-training loop: outer weights learn on meta-sequences of generated tasks.

One optimizer step reads a batch of meta-sequences (tasks.MetaSequences): for each segment k
and each of its sequences, the model reads the sequence from the fast state the previous one
left (state carried across segment boundaries, as the in-context protocol carries it across
tasks) and scores next-token cross-entropy. Truncated backpropagation: every `tbptt`
sequences the accumulated loss is backpropagated and the state detached, so gradients reach
back at most `tbptt` sequences. With `probe_weight` > 0, after each segment k ≥ 1 every row
also reads a fresh sequence of one of its earlier segments' tasks with update_state=False
(writes within that sequence happen, its final state is discarded) and that loss, times probe_weight, joins the window's loss: the
meta-continual objective, which rewards a state that still serves earlier tasks. Gradients of
all windows are summed (each loss divided by the number of sequences in the meta-sequence),
clipped to `grad_clip`, and the optimizer steps once.
"""

from __future__ import annotations

import time

import torch

from nlbench.models.base import detach_state


class PretrainDiverged(RuntimeError):
    """A non-finite loss or gradient norm during pretraining."""


def build_optimizer_for(block: dict, model):
    from nlbench.optim import build_optimizer

    hp = dict(block["optimizer"])
    return build_optimizer(hp.pop("name"), model, **hp)


def _clip_params(optimizer):
    due = getattr(optimizer, "due_params", None)
    params = due() if due is not None else [p for g in optimizer.param_groups for p in g["params"]]
    return [p for p in params if p.grad is not None]


def _finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value.detach()).all():
        raise PretrainDiverged(f"non-finite {what} ({float(value.detach())}) at pretraining step {step + 1}")


def train_step(model, optimizer, meta, block: dict, step: int, device) -> dict:
    """One meta-sequence batch; returns {'loss', 'first_segment_loss', 'later_segment_loss', 'probe_loss'}."""
    from nlbench.protocol.evaluate import autocast_for, lm_loss

    segments, per_seg = int(block["segments"]), int(block["segment_sequences"])
    tbptt, probe_w, dtype = int(block["tbptt"]), float(block["probe_weight"]), block["dtype"]
    n_seq = segments * per_seg
    plan = meta.plan(step)
    optimizer.zero_grad(set_to_none=True)
    state, window, in_window = None, 0.0, 0
    seg_losses, probe_losses = [], []
    for k in range(segments):
        seg_loss = 0.0
        for s in range(per_seg):
            x, y = meta.draw(step, plan[:, k], ("seg", k, s))
            x, y = x.to(device), y.to(device)
            with autocast_for(device, dtype):
                out = model(x, state=state, update_state=True)
            loss = lm_loss(out.logits, y)
            _finite(loss, "pretraining loss", step)
            seg_loss += float(loss.detach()) / per_seg
            window = window + loss / n_seq
            state = out.state
            if probe_w > 0 and k > 0 and s == per_seg - 1:
                earlier = meta.probe_segments(step, k)
                xp, yp = meta.draw(step, plan[range(len(earlier)), earlier], ("probe", k))
                with autocast_for(device, dtype):
                    probe = lm_loss(model(xp.to(device), state=state, update_state=False).logits, yp.to(device))
                _finite(probe, "probe loss", step)
                probe_losses.append(float(probe.detach()))
                window = window + probe_w * probe / n_seq
            in_window += 1
            if in_window == tbptt or (k == segments - 1 and s == per_seg - 1):
                if isinstance(window, torch.Tensor) and window.requires_grad:
                    window.backward()
                state, window, in_window = detach_state(state), 0.0, 0
        seg_losses.append(seg_loss)
    params = _clip_params(optimizer)
    max_norm = float(block["grad_clip"]) if block.get("grad_clip") else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    _finite(norm, "gradient norm", step)
    optimizer.step()
    return dict(loss=sum(seg_losses) / segments, first_segment_loss=seg_losses[0],
                later_segment_loss=(sum(seg_losses[1:]) / (segments - 1)) if segments > 1 else float("nan"),
                probe_loss=(sum(probe_losses) / len(probe_losses)) if probe_losses else float("nan"))


def pretrain(model, block: dict, stream, device, *, resume: dict | None = None, on_checkpoint=None,
             progress=None, stop_after_step: int | None = None) -> dict:
    """Train `model` in place for block['steps'] steps; returns {'history': [...], 'train_s'}.

    resume: a progress payload (step, model, optimizer, history, train_s, torch_rng) to continue
    from. on_checkpoint(payload) is called every checkpoint_every steps. stop_after_step is a
    test hook: return early after that many steps (as if the process had been killed).
    """
    from nlbench.pretrain.tasks import MetaSequences

    meta = MetaSequences(stream, block)
    optimizer = build_optimizer_for(block, model)
    start, history, train_s = 0, [], 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start, history, train_s = int(resume["step"]), list(resume["history"]), float(resume["train_s"])
        torch.set_rng_state(resume["torch_rng"])
    model.train()
    steps, every = int(block["steps"]), int(block["checkpoint_every"])
    for step in range(start, steps):
        t0 = time.perf_counter()
        row = train_step(model, optimizer, meta, block, step, device)
        train_s += time.perf_counter() - t0
        history.append(dict(step=step + 1, **row))
        if progress is not None:
            progress(step + 1, steps, row)
        done = step + 1
        if on_checkpoint is not None and done % every == 0 and done < steps:
            on_checkpoint(dict(step=done, model=model.state_dict(), optimizer=optimizer.state_dict(),
                               history=list(history), train_s=train_s, torch_rng=torch.get_rng_state()))
        if stop_after_step is not None and done >= stop_after_step and done < steps:
            break
    model.eval()
    return dict(history=history, train_s=train_s, steps_done=len(history))


__all__ = ["PretrainDiverged", "pretrain", "train_step"]
