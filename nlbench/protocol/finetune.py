"""Finetune protocol: the outer optimizer learns task 0, 1, … in order.

Per task: tokens_per_task // (batch_size · seq_len) optimizer steps (at least one) on that
task's training stream, seeded by (stream seed, task, run seed). Every training sequence
starts from the meta-learned initial fast state (state=None): what persists across tasks is
only what the outer optimizer wrote into the parameters, which is what forgetting measures.
Evaluation (loop.py): every task's held-out set at init (the b row), after each task, and
every `eval_every` tokens, each sequence from state=None.

One step: loss = cross-entropy(new ∪ replayed sequences) + strategy penalty; backward;
gradient norm checked (non-finite → diverged) and clipped to `grad_clip` over the parameters
the optimizer steps now (slow CMS levels hold multi-step gradient sums that per-step clipping
would rescale, nlbench/optim/build.py); optimizer step.
"""

from __future__ import annotations

import torch

from nlbench.protocol.evaluate import autocast_for, check_finite, evaluate, lm_loss
from nlbench.protocol.loop import Protocol
from nlbench.protocol.strategies import build_strategy


def build_outer_optimizer(config: dict, model):
    from nlbench.optim import build_optimizer

    hp = dict(config["train"]["optimizer"])
    name = hp.pop("name")
    return build_optimizer(name, model, **hp)


class Finetune(Protocol):
    name = "finetune"

    def __init__(self, config, model, stream, device, progress=None):
        super().__init__(config, model, stream, device, progress)
        self.optimizer = build_outer_optimizer(config, model)
        self.strategy = build_strategy(config, model, device)
        self.grad_clip = self.train_cfg.get("grad_clip")
        # strategy 'fresh': every task starts from these weights (the run's init, or its pretrained
        # weights; rebuilt identically on resume since the runner seeds before building the model)
        self.init_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                           if self.strategy.fresh_model else None)

    def start_task(self, i: int) -> None:
        """Strategy 'fresh': a new model for task i > 0 (initial weights, new optimizer state)."""
        if self.init_state is not None and i > 0:
            self.model.load_state_dict(self.init_state)
            self.optimizer = build_outer_optimizer(self.config, self.model)

    def score(self, task):
        return evaluate(self.model, self.eval_set(task), batch_size=int(self.eval_cfg["batch_size"]),
                        max_sequences=self.eval_cfg.get("max_sequences"), device=self.device, dtype=self.dtype,
                        output_groups=self.stream.output_groups)

    def _clip_params(self):
        due = getattr(self.optimizer, "due_params", None)
        params = due() if due is not None else [p for g in self.optimizer.param_groups for p in g["params"]]
        return [p for p in params if p.grad is not None]

    def train_task(self, i: int) -> None:
        task = self.stream.tasks[i]
        self.start_task(i)
        batches = self.strategy.train_batches(self.stream, i, self.batch_size, first_step=self.step)
        self.model.train()
        for s in range(self.steps_per_task):
            tokens, targets = next(batches)
            x, y = self.strategy.mix(tokens.to(self.device), targets.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            with autocast_for(self.device, self.dtype):
                logits = self.model(x, state=None).logits
            loss = lm_loss(logits, y, self.stream.output_groups)
            check_finite(loss, "training loss", self.step + 1, i)
            penalty = self.strategy.penalty()
            if penalty is not None:
                loss = loss + penalty
                check_finite(loss, "training loss with strategy penalty", self.step + 1, i)
            loss.backward()
            params = self._clip_params()
            max_norm = self.grad_clip if self.grad_clip else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
            check_finite(norm, "gradient norm", self.step + 1, i)
            self.optimizer.step()
            self.strategy.observe(tokens, targets)
            self.after_step(i, s)
        self.strategy.end_task(task)

    def extra_state(self):
        return dict(optimizer=self.optimizer.state_dict(), strategy=self.strategy.state_dict())

    def load_extra_state(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
