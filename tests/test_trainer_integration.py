"""MaskedAdamW as a drop-in optimizer for a Hugging Face Trainer (the OpenUnlearning-style fast path)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from wagle import MaskedAdamW, WeightMask
from wagle.data import encode_dataset, generate_rows, pad_batch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def training_args(tmp_path, **overrides):
    """Three quiet CPU steps, nothing saved or reported."""
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **overrides,
    )


def test_trainer_with_masked_adamw_updates_only_selected_weights(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    rows = generate_rows(num_authors=20)["forget10"][:8]
    examples = [{k: v for k, v in e.items() if k != "example_index"} for e in encode_dataset(rows, tok)]
    g = torch.Generator().manual_seed(0)
    mask = WeightMask.from_dict(
        {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MaskedAdamW(model.named_parameters(), mask, lr=1e-2, weight_decay=0.1, state_layout="compact")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = training_args(tmp_path, max_grad_norm=1.0)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        optimizers=(optimizer, scheduler),
        data_collator=lambda batch: pad_batch(batch, tok.pad_token_id),
    )
    trainer.train()
    changed = 0
    for name, param in model.named_parameters():
        selected = mask[name]
        assert torch.equal(param.detach()[~selected], before[name][~selected]), name
        changed += int((param.detach()[selected] != before[name][selected]).sum())
    assert changed > 0
    assert optimizer.state_nbytes() < 0.5 * sum(p.numel() * 8 for p in model.parameters())


def test_trainer_mixin_builds_a_masked_optimizer_from_training_args(tmp_path):
    from wagle.integrations import WagleTrainerMixin

    tok, model = tiny_tokenizer(), tiny_model()
    rows = generate_rows(num_authors=20)["forget10"][:8]
    examples = [{k: v for k, v in e.items() if k != "example_index"} for e in encode_dataset(rows, tok)]
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    # only the first half of the parameters have mask entries; the rest must stay frozen
    mask = WeightMask.from_dict(
        {
            n: torch.rand(p.shape, generator=g) < 0.4
            for n, p in list(model.named_parameters())[: len(names) // 2]
        }
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class MaskedTrainer(WagleTrainerMixin, transformers.Trainer):
        pass

    args = training_args(
        tmp_path, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=1
    )
    trainer = MaskedTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        wagle_mask=mask,
        data_collator=lambda batch: pad_batch(batch, tok.pad_token_id),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(inner, MaskedAdamW)
    assert inner.param_groups[0]["weight_decay"] == 0.1
    for name, param in model.named_parameters():
        if name in mask:
            assert torch.equal(param.detach()[~mask[name]], before[name][~mask[name]]), name
        else:
            assert torch.equal(param.detach(), before[name]), name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in mask)
    with pytest.raises(TypeError, match="wagle_mask"):
        MaskedTrainer(model=model, args=args, train_dataset=examples, wagle_mask={})
