"""Trainer subclasses in the patterns unlearning frameworks use (written here, no framework code), a
forget/retain paired dataset, and the explicit masked reference a masked run is compared against.

The reference is the stock Trainer subclass with its own torch optimizer, plus explicit masking: the
gradients are multiplied by the mask (restricted to the parameters the stock optimizer holds) after
every backward ("mask_then_clip") or right before the step ("clip_then_mask"), and after every step
the unselected entries are put back (torch.optim's update is elementwise, so the selected entries
follow exactly the stock optimizer on masked gradients, with the Trainer's decay groups)."""

from __future__ import annotations

import copy
import re
import types

import torch
import transformers
from helpers import tiny_model, tiny_tokenizer

from wagle import WeightMask
from wagle.data import encode_dataset, generate_rows, pad_batch

DEFAULTS = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "report_to": [],
    "save_strategy": "no",
    "logging_strategy": "no",
    "use_cpu": True,
    "disable_tqdm": True,
    "remove_unused_columns": False,
    "learning_rate": 1e-2,
    "weight_decay": 0.1,
    "lr_scheduler_type": "constant",
    "seed": 0,
}


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output_dir=str(tmp_path), **{**DEFAULTS, **overrides})


def paired_dataset(n: int = 8) -> list[dict]:
    """``{"forget": example, "retain": example}`` rows (the forget/retain pairing of such frameworks)."""
    tok = tiny_tokenizer()
    rows = generate_rows(num_authors=20)
    strip = lambda e: {k: v for k, v in e.items() if k != "example_index"}  # noqa: E731
    forget = [strip(e) for e in encode_dataset(rows["forget10"][:n], tok)]
    retain = [strip(e) for e in encode_dataset(rows["retain90"][:n], tok)]
    return [{"forget": f, "retain": r} for f, r in zip(forget, retain, strict=True)]


def paired_collator(batch: list[dict]) -> dict:
    pad = tiny_tokenizer().pad_token_id
    return {side: pad_batch([row[side] for row in batch], pad) for side in ("forget", "retain")}


def random_mask(model: torch.nn.Module, ratio: float = 0.3, seed: int = 0, skip=()) -> WeightMask:
    """Every parameter partly selected except names matching a pattern of ``skip`` (no selection)."""
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, param in model.named_parameters():
        chosen = torch.rand(param.shape, generator=g) < ratio
        entries[name] = chosen & False if any(re.search(s, name) for s in skip) else chosen
    return WeightMask.from_dict(entries)


class GradDiffLike(transformers.Trainer):
    """Own ``compute_loss`` on paired batches: ``-NLL_forget + alpha * NLL_retain``."""

    def __init__(self, *args, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        forget = model(**inputs["forget"])
        retain = model(**inputs["retain"])
        loss = -forget.loss + self.alpha * retain.loss
        return (loss, forget) if return_outputs else loss


def sequence_logprob(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


class NPOLike(GradDiffLike):
    """NPO with a deep-copied frozen reference model made in ``__init__``."""

    def __init__(self, *args, beta: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.ref_model = copy.deepcopy(self.model).eval()
        self.ref_model.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        logp = sequence_logprob(model, inputs["forget"])
        with torch.no_grad():
            ref = sequence_logprob(self.ref_model, inputs["forget"])
        forget_loss = -2.0 / self.beta * torch.nn.functional.logsigmoid(-self.beta * (logp - ref)).mean()
        loss = forget_loss + self.alpha * model(**inputs["retain"]).loss
        return (loss, None) if return_outputs else loss


class RegexTrainable(GradDiffLike):
    """``create_optimizer`` trains only parameters matching ``trainable_params_regex``: freeze all,
    unfreeze the matches, build the optimizer, unfreeze everything again."""

    def __init__(
        self, *args, trainable_params_regex=(r"model\.layers\.0\.mlp\.down_proj\.weight",), **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.trainable_params_regex = list(trainable_params_regex)

    def create_optimizer(self):
        for param in self.model.parameters():
            param.requires_grad = False
        for name, param in self.model.named_parameters():
            if any(re.fullmatch(p, name) for p in self.trainable_params_regex):
                param.requires_grad = True
        super().create_optimizer()
        for param in self.model.parameters():
            param.requires_grad = True


class OwnOptimizer(GradDiffLike):
    """``create_optimizer`` builds its own ``torch.optim.AdamW`` param groups (a higher lr for norms)."""

    def create_optimizer(self):
        if self.optimizer is None:
            named = list(self.model.named_parameters())
            norms = [p for n, p in named if "norm" in n]
            rest = [p for n, p in named if "norm" not in n]
            self.optimizer = torch.optim.AdamW(
                [{"params": rest, "weight_decay": 0.05}, {"params": norms, "weight_decay": 0.0, "lr": 2e-2}],
                lr=self.args.learning_rate,
            )
        return self.optimizer


def reference_of(pattern: type, mask: WeightMask, clip_mode: str = "mask_then_clip") -> type:
    """The stock ``pattern`` with explicit masking (see the module docstring)."""

    class Reference(pattern):
        def create_optimizer(self, *args, **kwargs):
            super().create_optimizer(*args, **kwargs)
            optimizer = self.optimizer
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.selection = {
                id(p): (mask[n] if n in mask and id(p) in held else torch.zeros(p.shape, dtype=torch.bool))
                for n, p in self.model.named_parameters()
            }
            self.start = {id(p): p.detach().clone() for p in self.model.parameters()}
            stock_step = optimizer.step

            def step(_optimizer, *a, **k):
                if clip_mode == "clip_then_mask":
                    self.mask_grads()
                out = stock_step(*a, **k)
                with torch.no_grad():
                    for p in self.model.parameters():
                        keep = ~self.selection[id(p)]
                        p[keep] = self.start[id(p)][keep]
                return out

            optimizer.step = types.MethodType(step, optimizer)  # bound, as LR schedulers expect
            return optimizer

        def mask_grads(self):
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.selection[id(p)])

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if clip_mode == "mask_then_clip":
                self.mask_grads()
            return loss

    Reference.__name__ = f"Reference{pattern.__name__}"
    return Reference


def run(trainer_cls: type, tmp_path, mask=None, *, seed: int = 0, trainer_kwargs=None, **arg_overrides):
    """Train a fresh tiny model with ``trainer_cls``; returns (trainer, start weights, end weights)."""
    model = tiny_model(seed=seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = dict(trainer_kwargs or {})
    if mask is not None:
        extra["wagle_mask"] = mask
    trainer = trainer_cls(
        model=model,
        args=training_args(tmp_path, **arg_overrides),
        train_dataset=paired_dataset(),
        data_collator=paired_collator,
        **extra,
    )
    trainer.train()
    return trainer, start, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_masked_update(mask, start, ours, reference, *, trained=None, rtol=1e-5, atol=1e-6):
    """Unselected (and untrained) weights bit-identical to the start; the rest equal to the reference;
    something moved."""
    moved = 0
    for name, before in start.items():
        after = ours[name]
        sel = (
            mask[name]
            if name in mask and (trained is None or name in trained)
            else torch.zeros_like(before, dtype=torch.bool)
        )
        assert torch.equal(after[~sel], before[~sel]), f"{name}: unselected weights changed"
        assert torch.equal(reference[name][~sel], before[~sel]), f"{name}: reference moved unselected weights"
        torch.testing.assert_close(after[sel], reference[name][sel], rtol=rtol, atol=atol, msg=name)
        moved += int((after[sel] != before[sel]).sum())
    assert moved > 0
