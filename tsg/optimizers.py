"""Muon for the weight matrices, AdamW for the rest, as the one optimizer the Trainer steps (`use_muon`).

Muon (torch.optim.Muon) orthogonalises each update of a 2-D weight matrix; it is not meant for embeddings, the
output layer, norms or biases, which stay on the run's AdamW (`optim`, with its betas, epsilon and weight decay).
Muon takes the run's weight_decay and learning_rate too (or its own `muon_learning_rate`):
`adjust_lr_fn="match_rms_adamw"` scales its update to the size of an AdamW one (Moonshot, "Muon is Scalable for
LLM Training"), so a rate tuned for AdamW is a starting point, and one learning-rate schedule drives both.

    optimizer = MuonWithAdamW(muon_parameters(model), Muon(...), AdamW(...))

`MuonWithAdamW` holds the two and shows the Trainer, Accelerate and the LR scheduler one optimizer: its
param_groups are both optimizers' groups (the same dicts, so a scheduler's rate reaches both), its state_dict
holds both states (optimizer.pt of a checkpoint), and load_state_dict restores both on resume.
"""

from __future__ import annotations

import torch
from torch import nn

from tsg.files import UserError


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) trainable parameters: the 2-D weight matrices inside the model, then everything else
    (embeddings, the output layer even when untied, norms, biases)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embeddings.add(id(output.weight))
    muon, adamw = [], []
    for p in model.parameters():
        if p.requires_grad:
            (muon if p.ndim == 2 and id(p) not in embeddings else adamw).append(p)
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers stepped as one: Muon on the weight matrices, AdamW on the rest (see the module's text)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        # AdamW's groups first: the Trainer logs the first group's rate as learning_rate
        groups = [group for optimizer in (adamw, muon) for group in optimizer.param_groups]
        super().__init__([p for group in groups for p in group["params"]], {})  # the hooks and checks of one
        self.optimizers = {"adamw": adamw, "muon": muon}

    # After __init__, the groups are the two optimizers' own, read anew each time: their load_state_dict replaces
    # their group dicts, and a learning rate a scheduler sets here must be theirs.
    @property
    def param_groups(self):
        if "optimizers" not in self.__dict__:  # inside Optimizer.__init__
            return self.__dict__.setdefault("_groups_at_init", [])
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value):
        self.__dict__["_groups_at_init"] = value

    @property
    def state(self):
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    @state.setter
    def state(self, value):  # Optimizer.__init__ sets an empty state; each optimizer keeps its own
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers.values():
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict[name])


def build_muon_with_adamw(model: nn.Module, adamw_class, adamw_kwargs: dict, learning_rate: float,
                          weight_decay: float, decay_names: set[str],
                          muon_learning_rate: float | None = None) -> MuonWithAdamW:
    """Muon (momentum 0.95, Nesterov, AdamW-matched update size) on the weight matrices at `muon_learning_rate`
    (default: `learning_rate`), `adamw_class(**kwargs)` (the Trainer's class for `optim`) on the rest at
    `learning_rate`; weight decay on the matrices and on the parameters named in `decay_names` (the Trainer's
    choice: not norms, not biases)."""
    matrices, rest = muon_parameters(model)
    if not matrices:
        raise UserError("use_muon: the model has no trainable weight matrices for Muon (2-D, not embeddings)")
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [{"params": [p for p in rest if names[id(p)] in decay_names], "weight_decay": weight_decay},
              {"params": [p for p in rest if names[id(p)] not in decay_names], "weight_decay": 0.0}]
    muon = torch.optim.Muon(matrices, lr=muon_learning_rate or learning_rate, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    adamw = adamw_class([group for group in groups if group["params"]], **{**adamw_kwargs, "lr": learning_rate})
    return MuonWithAdamW(muon, adamw)
