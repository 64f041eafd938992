"""Continual-learning strategies and reference points for the finetune protocol: naive, replay,
EWC, joint, fresh.

A strategy chooses the training batches of each task phase (`train_batches`), sees each batch
before the step (`mix`), the model for an extra loss term (`penalty`), each batch after the step
(`observe`) and the end of every task (`end_task`); `fresh_model` asks the protocol to start each
task from the initial weights with a new optimizer. Its whole state goes into the per-task
checkpoint (`state_dict` / `load_state_dict`).

- naive: plain sequential fine-tuning, the forgetting baseline.
- replay (experience replay with a reservoir buffer, Chaudhry et al. 2019 "tiny episodic
  memories"): every training sequence seen so far has the same probability buffer_size / n of
  being in the buffer; each batch of B new sequences is extended with round(ratio · B)
  sequences drawn uniformly from the buffer.
- ewc (Kirkpatrick et al. 2017): after task k, F_k = diagonal empirical Fisher, the mean over
  `fisher_samples` training sequences of (∂ℓ_seq/∂θ)² with ℓ_seq the sequence's mean token loss
  on its observed targets, and θ*_k = θ. Later tasks add λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)².
- joint (multitask upper bound): every phase trains on all tasks' data interleaved batch by
  batch (run step k takes a batch of task k mod T), with the same steps per phase and so
  the same total tokens as sequential training; row i of R is measured after phase i, so the
  last row is the jointly trained model. Each phase draws fresh batches (seeded by phase and
  task), so a resumed run repeats it exactly.
- fresh (plasticity without interference): each task starts from the run's initial weights
  (the same init, or the same pretrained weights) with a new optimizer; R[i][i] is what a model
  learns of task i alone, and the old tasks' rows show what is lost with no memory at all.
"""

from __future__ import annotations

import torch

from nlbench.protocol.evaluate import autocast_for, lm_loss


def derive_seed(*parts) -> int:
    from nlbench.tasks.base import derive_seed as _derive

    return _derive(*parts)


class Naive:
    name = "naive"
    fresh_model = False  # True: the protocol restores the initial weights and optimizer at each task start

    def __init__(self, config: dict, model, device: torch.device):
        self.config, self.model, self.device = config, model, device
        self.seed = int(config["seed"])

    def train_batches(self, stream, i: int, batch_size: int, first_step: int = 0):
        """The batch iterator of task phase ``i`` (whose first step is run step ``first_step``):
        task i's own training stream."""
        return stream.tasks[i].train_batches(batch_size, seed=self.seed)

    def mix(self, tokens: torch.Tensor, targets: torch.Tensor):
        return tokens, targets

    def penalty(self) -> torch.Tensor | None:
        return None

    def observe(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def end_task(self, task) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Replay(Naive):
    name = "replay"

    def __init__(self, config: dict, model, device: torch.device):
        super().__init__(config, model, device)
        self.buffer_size = int(config["replay"]["buffer_size"])
        self.ratio = float(config["replay"]["ratio"])
        self.tokens: torch.Tensor | None = None     # [n_stored, T] on CPU
        self.targets: torch.Tensor | None = None
        self.n_seen = 0
        # replay draws have their own generator: turning replay on leaves the data order and
        # every other random stream of the run untouched
        self.gen = torch.Generator().manual_seed(derive_seed(self.seed, "replay") % 2**63)

    @property
    def n_stored(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[0]

    def mix(self, tokens, targets):
        k = round(self.ratio * tokens.shape[0])
        if k == 0 or self.n_stored == 0:
            return tokens, targets
        idx = torch.randint(self.n_stored, (k,), generator=self.gen)
        return (torch.cat([tokens, self.tokens[idx].to(tokens.device)]),
                torch.cat([targets, self.targets[idx].to(targets.device)]))

    def observe(self, tokens, targets):
        """Reservoir sampling (Vitter's algorithm R), one sequence at a time."""
        tokens, targets = tokens.detach().cpu(), targets.detach().cpu()
        if self.tokens is None:
            self.tokens = torch.empty((0, tokens.shape[1]), dtype=tokens.dtype)
            self.targets = torch.empty((0, targets.shape[1]), dtype=targets.dtype)
        if tokens.shape[1] != self.tokens.shape[1]:
            raise ValueError(f"replay: sequences of length {tokens.shape[1]} cannot join a buffer of length {self.tokens.shape[1]}.")
        for b in range(tokens.shape[0]):
            self.n_seen += 1
            if self.n_stored < self.buffer_size:
                self.tokens = torch.cat([self.tokens, tokens[b:b + 1]])
                self.targets = torch.cat([self.targets, targets[b:b + 1]])
            else:
                j = int(torch.randint(self.n_seen, (1,), generator=self.gen))
                if j < self.buffer_size:
                    self.tokens[j], self.targets[j] = tokens[b], targets[b]

    def state_dict(self):
        return dict(tokens=self.tokens, targets=self.targets, n_seen=self.n_seen, gen=self.gen.get_state())

    def load_state_dict(self, state):
        self.tokens, self.targets, self.n_seen = state["tokens"], state["targets"], int(state["n_seen"])
        self.gen.set_state(state["gen"])


class EWC(Naive):
    name = "ewc"

    def __init__(self, config: dict, model, device: torch.device):
        super().__init__(config, model, device)
        self.lam = float(config["ewc"]["lam"])
        self.fisher_samples = int(config["ewc"]["fisher_samples"])
        self.dtype = config["train"]["dtype"]
        # one (F_k, θ*_k) per finished task, by parameter name
        self.tasks: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def _params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def penalty(self):
        if not self.tasks or self.lam == 0:
            return None
        params = dict(self._params())
        total = 0.0
        for fisher, star in self.tasks:
            for n, f in fisher.items():
                total = total + (f * (params[n] - star[n]).pow(2)).sum()
        return 0.5 * self.lam * total

    def fisher(self, task) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher on `fisher_samples` single sequences of the task's training
        data (a data stream of its own). torch.autograd.grad keeps `.grad` untouched, so
        gradients a slow CMS level is accumulating in the optimizer are not disturbed."""
        named = self._params()
        names, params = [n for n, _ in named], [p for _, p in named]
        acc = [torch.zeros_like(p) for p in params]
        it = task.train_batches(1, seed=derive_seed(self.seed, "ewc-fisher", task.index))
        was_training = self.model.training
        self.model.train()
        for _ in range(self.fisher_samples):
            x, y = next(it)
            x, y = x.to(self.device), y.to(self.device)
            with autocast_for(self.device, self.dtype):
                logits = self.model(x, state=None).logits
            grads = torch.autograd.grad(lm_loss(logits, y, task.output_groups), params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().float().pow(2))
        self.model.train(was_training)
        return {n: a / self.fisher_samples for n, a in zip(names, acc)}

    def end_task(self, task):
        fisher = self.fisher(task)
        star = {n: p.detach().clone() for n, p in self._params()}
        self.tasks.append((fisher, star))

    def state_dict(self):
        return dict(tasks=[(dict(f), dict(s)) for f, s in self.tasks])

    def load_state_dict(self, state):
        self.tasks = [({n: t.to(self.device) for n, t in f.items()}, {n: t.to(self.device) for n, t in s.items()})
                      for f, s in state["tasks"]]


class Joint(Naive):
    name = "joint"

    def train_batches(self, stream, i: int, batch_size: int, first_step: int = 0):
        # the rotation runs over the whole run's steps, so with fewer steps per phase than tasks
        # every task still gets its share of the total
        its = [t.train_batches(batch_size, seed=derive_seed(self.seed, "joint", i, t.index)) for t in stream.tasks]

        def interleaved():
            k = first_step
            while True:
                yield next(its[k % len(its)])
                k += 1
        return interleaved()


class Fresh(Naive):
    name = "fresh"
    fresh_model = True


STRATEGIES = {"naive": Naive, "replay": Replay, "ewc": EWC, "joint": Joint, "fresh": Fresh}


def build_strategy(config: dict, model, device: torch.device):
    name = config["strategy"]
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {name!r}.")
    return STRATEGIES[name](config, model, device)
