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


# ---- optimizer choice, mask files, registries, unsupported setups (no training needed) ----------


def _optim_names():
    return {str(getattr(o, "value", o)) for o in transformers.training_args.OptimizerNames}


ADAMW_VARIANTS = [
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_apex_fused",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
]


def _patterns_trainer(tmp_path, mask, trainer_kwargs=None, **overrides):
    from trainer_patterns import GradDiffLike, paired_collator, paired_dataset, training_args

    from wagle.integrations import masked

    return masked(GradDiffLike)(
        model=tiny_model(),
        args=training_args(tmp_path, **overrides),
        train_dataset=paired_dataset(),
        data_collator=paired_collator,
        wagle_mask=mask,
        **(trainer_kwargs or {}),
    )


@pytest.mark.parametrize("optim", ADAMW_VARIANTS)
def test_adamw_family_maps_to_masked_adamw_with_the_trainers_kwargs(tmp_path, optim, caplog):
    from trainer_patterns import random_mask

    if optim not in _optim_names():
        pytest.skip(f"{optim} is not an optimizer name of transformers {transformers.__version__}")
    mask = random_mask(tiny_model())
    trainer = _patterns_trainer(
        tmp_path, mask, optim=optim, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6
    )
    with caplog.at_level("WARNING", logger="wagle.integrations.hf_optim"):
        trainer.create_optimizer()
    optimizer = trainer.wagle_optimizer
    assert isinstance(optimizer, MaskedAdamW)
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (1e-2, (0.8, 0.95), 1e-6)
    warned = [r.getMessage() for r in caplog.records if r.name == "wagle.integrations.hf_optim"]
    if "8bit" in optim or "paged" in optim:
        assert warned and "not reproduced" in warned[0] and ("8-bit" in warned[0] or "paged" in warned[0])
    elif optim in ("adamw_torch", "adamw_torch_fused"):
        assert not warned


def test_sgd_maps_to_masked_sgd_as_the_trainer_reads_optim_args(tmp_path):
    from trainer_patterns import random_mask

    from wagle import MaskedSGD

    trainer = _patterns_trainer(
        tmp_path, random_mask(tiny_model()), optim="sgd", optim_args="momentum=0.9,nesterov=True"
    )
    trainer.create_optimizer()
    _, stock = transformers.Trainer.get_optimizer_cls_and_kwargs(trainer.args)  # what this version reads
    optimizer = trainer.wagle_optimizer
    assert isinstance(optimizer, MaskedSGD)
    for group in optimizer.param_groups:
        assert group["momentum"] == stock.get("momentum", 0.0)
        assert group["nesterov"] == stock.get("nesterov", False)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("optim", ["adafactor", "lion_32bit", "adagrad", "rmsprop"])
def test_other_optimizers_are_refused_naming_args_optim(tmp_path, optim):
    from trainer_patterns import random_mask

    trainer = _patterns_trainer(tmp_path, random_mask(tiny_model()), optim=optim)
    with pytest.raises(ValueError, match=rf"args\.optim='{optim}'.*MaskedAdamW.*'sgd'"):
        trainer.create_optimizer()


def test_a_given_torch_optimizer_is_refused(tmp_path):
    from trainer_patterns import GradDiffLike, paired_collator, paired_dataset, random_mask, training_args

    from wagle.integrations import masked

    model = tiny_model()
    with pytest.raises(TypeError, match="optimizers: .*AdamW"):
        masked(GradDiffLike)(
            model=model,
            args=training_args(tmp_path),
            train_dataset=paired_dataset(),
            data_collator=paired_collator,
            optimizers=(torch.optim.AdamW(model.parameters()), None),
            wagle_mask=random_mask(model),
        )


def test_mask_path_is_loaded_and_checked(tmp_path):
    from trainer_patterns import random_mask

    from wagle import MaskMismatchError

    path = tmp_path / "mask.safetensors"
    mask = random_mask(tiny_model(), seed=3)
    mask.save(path)
    trainer = _patterns_trainer(tmp_path, str(path))
    assert trainer.wagle_mask.fingerprint == mask.fingerprint
    assert all(torch.equal(trainer.wagle_mask[n], mask[n]) for n in mask)
    other = tmp_path / "other.safetensors"
    random_mask(tiny_model(hidden_size=48)).save(other)
    with pytest.raises(MaskMismatchError):
        _patterns_trainer(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        _patterns_trainer(tmp_path, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="wagle_mask"):
        _patterns_trainer(tmp_path, 3)


def test_masked_makes_one_cached_subclass_for_a_registry(tmp_path):
    from trainer_patterns import GradDiffLike, NPOLike, paired_collator, paired_dataset, random_mask

    from wagle.integrations import WagleTrainerMixin, masked

    cls = masked(NPOLike)
    assert cls is masked(NPOLike) and masked(cls) is cls
    assert cls.__name__ == "MaskedNPOLike" and issubclass(cls, (WagleTrainerMixin, NPOLike))
    assert masked(GradDiffLike) is not cls
    with pytest.raises(TypeError, match="trainer_cls"):
        masked(torch.nn.Module)
    # a registry keyed by class name and a YAML-like config naming the handler and the mask file
    registry = {c.__name__: c for c in (masked(GradDiffLike), masked(NPOLike))}
    random_mask(tiny_model()).save(tmp_path / "mask.safetensors")
    config = {
        "handler": "MaskedNPOLike",
        "method_args": {"beta": 0.2, "wagle_mask": str(tmp_path / "mask.safetensors")},
        "args": {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "max_steps": 1},
    }
    trainer = registry[config["handler"]](
        model=tiny_model(),
        args=transformers.TrainingArguments(**config["args"], remove_unused_columns=False),
        train_dataset=paired_dataset(),
        data_collator=paired_collator,
        **config["method_args"],
    )
    trainer.create_optimizer()
    assert trainer.beta == 0.2 and isinstance(trainer.wagle_optimizer, MaskedAdamW)


def test_deepspeed_and_partitioned_parameters_are_refused(tmp_path):
    from trainer_patterns import GradDiffLike, paired_collator, paired_dataset, random_mask, training_args

    from wagle.integrations import masked

    class AsIfDeepSpeed(GradDiffLike):  # what accelerate's DeepSpeed state makes the Trainer record
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.is_deepspeed_enabled = True

    model = tiny_model()
    common = {
        "args": training_args(tmp_path),
        "train_dataset": paired_dataset(),
        "data_collator": paired_collator,
    }
    with pytest.raises(ValueError, match="DeepSpeed.*not supported.*one device, or DDP"):
        masked(AsIfDeepSpeed)(model=model, wagle_mask=random_mask(model), **common)
    zero3 = tiny_model()
    mask = random_mask(zero3)
    weight = zero3.model.layers[0].mlp.down_proj.weight
    weight.data = torch.empty(0)  # what ZeRO-3 leaves locally, with its bookkeeping attributes
    weight.ds_id, weight.ds_numel = 7, 2048
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
        masked(GradDiffLike)(model=zero3, wagle_mask=mask, **common)


def test_optimizer_cls_and_kwargs_is_mapped_where_the_trainer_takes_it(tmp_path):
    import inspect

    from trainer_patterns import GradDiffLike, paired_collator, paired_dataset, random_mask, training_args

    from wagle import MaskedSGD
    from wagle.integrations import masked

    if "optimizer_cls_and_kwargs" not in inspect.signature(transformers.Trainer.__init__).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no optimizer_cls_and_kwargs")
    model = tiny_model()
    common = {
        "args": training_args(tmp_path),
        "train_dataset": paired_dataset(),
        "data_collator": paired_collator,
    }
    trainer = masked(GradDiffLike)(
        model=model,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.2, "momentum": 0.5}),
        wagle_mask=random_mask(model),
        **common,
    )
    trainer.create_optimizer()
    assert isinstance(trainer.wagle_optimizer, MaskedSGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in trainer.wagle_optimizer.param_groups] == [
        (0.2, 0.5, 0.1),
        (0.2, 0.5, 0.0),
    ]
    assert trainer.optimizer_cls_and_kwargs[0] is torch.optim.SGD  # the user's setting is left as given
    other = tiny_model()
    trainer = masked(GradDiffLike)(
        model=other,
        optimizer_cls_and_kwargs=(torch.optim.Adagrad, {"lr": 0.2}),
        wagle_mask=random_mask(other),
        **common,
    )
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs.*Adagrad"):
        trainer.create_optimizer()


def test_state_options(tmp_path):
    from trainer_patterns import random_mask

    mask = random_mask(tiny_model())
    options = {"wagle_state_dtype": "bfloat16", "wagle_state_layout": "dense"}
    trainer = _patterns_trainer(tmp_path, mask, trainer_kwargs=options)
    trainer.create_optimizer()
    assert trainer.wagle_optimizer.state_dtype == torch.bfloat16
    assert trainer.wagle_optimizer.state_layout == "dense"
    for option, value in (
        ("wagle_state_dtype", "float16"),
        ("wagle_state_layout", "sparse"),
        ("wagle_clip_mode", "clip"),
    ):
        with pytest.raises(ValueError, match=option):
            _patterns_trainer(tmp_path, mask, trainer_kwargs={option: value})
