"""Representation misdirection for unlearning (RMU)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from wagle.errors import UserError

from .base import Objective, _model_inputs


def _hidden(model: torch.nn.Module, batch, layer: int) -> torch.Tensor:
    """Output of decoder layer ``layer`` (hidden_states[layer + 1]), fp32."""
    outputs = model(**_model_inputs(batch), output_hidden_states=True)
    states = outputs.hidden_states
    if not 0 <= layer < len(states) - 1:
        raise UserError(f"layer: {layer} is out of range for a model with {len(states) - 1} layers")
    return states[layer + 1].float()


def _masked_mse(a: torch.Tensor, b: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    weight = attention.unsqueeze(-1).to(a.dtype)
    return ((a - b).pow(2) * weight).sum() / (weight.sum() * a.shape[-1]).clamp(min=1)


class RMU(Objective):
    """L = mean_f ||h_L(x_f) - c * u||^2 + alpha * mean_r ||h_L(x_r) - h_L^frozen(x_r)||^2.

    h_L is the output of decoder layer ``layer`` (per token, non-padding positions, averaged over the
    hidden size), u a fixed random unit vector (seeded), c the steering coefficient. The frozen model's
    retain activations are computed once in :meth:`prepare` (memory: one activation matrix per retain
    example) instead of keeping a second model.
    """

    name = "rmu"

    def __init__(
        self, layer: int | None = None, steering_coef: float = 6.5, alpha: float = 100.0, seed: int = 0
    ):
        if steering_coef <= 0 or alpha < 0:
            raise UserError("steering_coef: must be > 0 and alpha >= 0")
        self.layer, self.steering_coef, self.alpha, self.seed = layer, steering_coef, alpha, seed
        self.control: torch.Tensor | None = None
        self.frozen: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def prepare(self, model, forget, retain, *, progress):
        if retain is None:
            raise UserError("retain: RMU needs a retain set")
        if self.layer is None:
            self.layer = model.config.num_hidden_layers // 2
        if self.control is None:
            g = torch.Generator().manual_seed(self.seed)
            u = torch.rand(model.config.hidden_size, generator=g)
            self.control = u / u.norm()
        if self.frozen:
            return  # restored from a checkpoint
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for batch in tqdm(retain, desc="RMU frozen activations", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = _hidden(model, batch, self.layer)
            for row, index in enumerate(batch["example_index"].tolist()):
                length = int(batch["attention_mask"][row].sum())
                self.frozen[index] = hidden[row, :length].cpu()
        model.train(was_training)

    def loss(self, model, forget, retain):
        if self.control is None or retain is None:
            raise RuntimeError("RMU.loss needs prepare() and a retain batch")
        h_f = _hidden(model, forget, self.layer)
        target = (self.steering_coef * self.control.to(h_f.device)).expand_as(h_f)
        forget_loss = _masked_mse(h_f, target, forget["attention_mask"])
        h_r = _hidden(model, retain, self.layer)
        frozen = torch.zeros_like(h_r)
        for row, index in enumerate(retain["example_index"].tolist()):
            saved = self.frozen[index]
            frozen[row, : saved.shape[0]] = saved.to(h_r.device)
        retain_loss = _masked_mse(h_r, frozen, retain["attention_mask"])
        total = forget_loss + self.alpha * retain_loss
        return total, {"rmu_forget": float(forget_loss.detach()), "rmu_retain": float(retain_loss.detach())}

    def state_dict(self):
        state = {f"frozen.{i}": t for i, t in self.frozen.items()}
        if self.control is not None:
            state["control"] = self.control
            state["layer"] = torch.tensor(self.layer)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.control = state.get("control")
        if "layer" in state:
            self.layer = int(state["layer"])
        self.frozen = {int(k.split(".", 1)[1]): v for k, v in state.items() if k.startswith("frozen.")}
