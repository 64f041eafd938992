"""In-context protocol: the outer parameters stay frozen; only the fast state learns.

`batch_size` independent streams each read task 0's training sequences, then task 1's, …;
the fast state (in-context memories) returned for one sequence is the state the next sequence
of the same stream starts from, across task boundaries (state carried, never reset). Per
task the streams read tokens_per_task // (batch_size · seq_len) sequences each.

Evaluation probes every task's held-out set from a clone of the current state with
update_state=False: each probe sequence still writes into its own copy as it is read (that is
how the memories mix tokens), but the state after it is discarded, so scoring never carries
into the memory it measures. The b row scores the
meta-learned initial state (state=None). A model without fast state (the plain Transformer)
cannot learn here: its matrix is constant; with `kv_window` its KV cache is its fast state.
A config's `pretrain:` block starts the model from meta-trained outer weights (nlbench/pretrain,
loaded by the runner); without it those weights are the random initialisation.
"""

from __future__ import annotations

import torch

from nlbench.models.base import clone_state, detach_state
from nlbench.protocol.evaluate import autocast_for, check_finite, evaluate_with_state, lm_loss
from nlbench.protocol.loop import Protocol


class InContext(Protocol):
    name = "in_context"

    def __init__(self, config, model, stream, device, progress=None):
        super().__init__(config, model, stream, device, progress)
        self.state = None
        self.model.eval()

    def score(self, task):
        return evaluate_with_state(self.model, self.eval_set(task), self.state, streams=self.batch_size,
                                   max_sequences=self.eval_cfg.get("max_sequences"), device=self.device,
                                   dtype=self.dtype, output_groups=self.stream.output_groups)

    @torch.no_grad()
    def train_task(self, i: int) -> None:
        task = self.stream.tasks[i]
        batches = task.train_batches(self.batch_size, seed=self.seed)
        for s in range(self.steps_per_task):
            tokens, targets = next(batches)
            x, y = tokens.to(self.device), targets.to(self.device)
            with autocast_for(self.device, self.dtype):
                out = self.model(x, state=self.state, update_state=True)
            check_finite(lm_loss(out.logits, y, self.stream.output_groups), "in-context loss", self.step + 1, i)
            self.state = detach_state(out.state)
            self.after_step(i, s)

    def extra_state(self):
        return dict(state=clone_state(self.state))

    def load_extra_state(self, state):
        self.state = clone_state(state["state"])
        if self.state is not None:
            from nlbench.models.base import map_state

            self.state = map_state(lambda t: t.to(self.device), self.state)
