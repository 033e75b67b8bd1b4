"""The baselines as their authors intend: AdaLoRA's regulariser weight, CorDA without padding rows and computed on
rank 0, LoRA+ refused when DeepSpeed would replace its optimizer, EVA's rank pattern checked across ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from training_helpers import free_port, load_task, tiny_run_arguments

MATH = load_task("math_train.py")


def orthogonal_regulariser(model: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's regulariser R as its paper states it: the mean over A and B of ||P P^T - I||_F (rows of A, columns
    of B), written out here as an independent reference."""
    terms = []
    for name, parameter in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            gram = parameter @ parameter.T if "lora_A" in name else parameter.T @ parameter
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0]), ord="fro"))
    return torch.stack(terms).mean()


def _adalora_on_rank(rank: int, world_size: int, port: int, model_dir: str, output_dir: str, report: str) -> None:
    """One rank of a two-process DDP run (gloo): the gradients of one optimizer step with and without the regulariser."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    from peft import TaskType
    from transformers import AutoModelForCausalLM, TrainerCallback, set_seed

    from tlora.training.core import build_task_data, build_trainer, load_tokenizer, parse_training_arguments
    from tlora.training.data import PaddingCollator
    from tlora.training.methods import MethodContext
    from tlora.training.registry import build_method

    arguments = tiny_run_arguments(
        Path(model_dir), Path(output_dir), "adalora",
        "--global_batch_size", "8", "--per_device_train_batch_size", "2", "--max_steps", "1", "--max_grad_norm", "0",
        "--use_cpu", "true",  # DDP over gloo between the two CPU processes
    )
    model_args, data_args, method_args, training_args = parse_training_arguments(MATH, arguments)
    tokenizer = load_tokenizer(model_args)
    data = build_task_data(MATH, data_args, tokenizer, show_progress=False)
    collator = PaddingCollator(tokenizer.pad_token_id)

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    gradients = {}
    for weight in (0.5, 0.0):
        set_seed(42)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        context = MethodContext(model, method_args, training_args, TaskType.CAUSAL_LM, None, Path(output_dir), 1)
        built = build_method(context)
        built.model.peft_config["default"].orth_reg_weight = weight
        capture = Capture()
        build_trainer(MATH, built, training_args, data, collator, tokenizer, [capture]).train()
        gradients[weight] = capture.gradients
    if rank == 0:
        set_seed(42)
        reference = build_method(
            MethodContext(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), method_args,
                          training_args, TaskType.CAUSAL_LM, None, Path(output_dir), 1)
        ).model
        names = [n for n, _ in reference.named_parameters() if ("lora_A" in n or "lora_B" in n)]
        parameters = dict(reference.named_parameters())
        expected = torch.autograd.grad(orthogonal_regulariser(reference), [parameters[n] for n in names])
        difference = [gradients[0.5][n] - gradients[0.0][n] for n in names]
        weight = sum((d * e).sum() for d, e in zip(difference, expected)) / sum((e * e).sum() for e in expected)
        residual = max(float((d - weight * e).abs().max()) for d, e in zip(difference, expected))
        Path(report).write_text(json.dumps({
            "weight": float(weight), "residual": residual, "accumulation": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size,
        }))


def test_adalora_regulariser_weight_is_independent_of_accumulation_and_world_size(tiny_model_dir, tmp_path):
    report = tmp_path / "report.json"
    torch.multiprocessing.spawn(
        _adalora_on_rank, args=(2, free_port(), str(tiny_model_dir), str(tmp_path / "run"), str(report)), nprocs=2, join=True
    )
    result = json.loads(report.read_text())
    assert (result["accumulation"], result["world_size"]) == (2, 2)
    # The optimizer sees 0.5 x grad R, as with AdaLoRA's own trainer; unscaled it would be 0.5 x 2 x 2 = 2.
    assert result["weight"] == pytest.approx(0.5, rel=1e-3)
    assert result["residual"] < 1e-5


def test_trainer_loss_multiplier_follows_the_trainer(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from tlora.training.adalora import trainer_loss_multiplier

    def trainer(accepts: bool, processes: int, average: bool = True):
        return SimpleNamespace(
            loss_is_scaled_for_ga=None, model_accepts_loss_kwargs=accepts, compute_loss_func=None,
            current_gradient_accumulation_steps=4, args=SimpleNamespace(average_tokens_across_devices=average),
            accelerator=SimpleNamespace(num_processes=processes), get_tp_size=lambda: 1,
        )

    assert trainer_loss_multiplier(trainer(True, 8), 1000) == 32  # token-normalised: not divided, times processes
    assert trainer_loss_multiplier(trainer(True, 8, average=False), 1000) == 4
    assert trainer_loss_multiplier(trainer(True, 8), None) == 1  # no token count: the Trainer divides by the steps
    assert trainer_loss_multiplier(trainer(False, 8), 1000) == 1


def corda_adapter(model_dir: Path, output_dir: Path, pad_to_multiple_of) -> dict[str, torch.Tensor]:
    """The CorDA adapter (A and B) built on 6 calibration samples with a collator rounding to `pad_to_multiple_of`."""
    from peft import TaskType
    from transformers import AutoModelForCausalLM

    from tlora.training.core import build_task_data, load_tokenizer, parse_training_arguments
    from tlora.training.data import PaddingCollator, draw_calibration_set
    from tlora.training.methods import MethodContext
    from tlora.training.registry import build_method

    model_args, data_args, method_args, training_args = parse_training_arguments(
        MATH, tiny_run_arguments(model_dir, output_dir, "corda")
    )
    tokenizer = load_tokenizer(model_args)
    data = build_task_data(MATH, data_args, tokenizer, show_progress=False)
    collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    calibration = draw_calibration_set(data.train, 6, 42, collator)
    lengths = [len(data.train[i]["input_ids"]) for i in calibration.indices]
    assert any(length % 64 for length in lengths), "the samples must need padding to a multiple of 64"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    context = MethodContext(model, method_args, training_args, TaskType.CAUSAL_LM, calibration, output_dir, 1)
    built = build_method(context)
    return {n: p.detach().clone() for n, p in built.model.named_parameters() if "lora_" in n}


def test_corda_covariance_holds_no_padding_rows(tiny_model_dir, tmp_path):
    # The GPU collator pads to a multiple of 8; CorDA's hooks ignore the attention mask. Its calibration batches of
    # one sample must hold no padding, so a collator that pads (64 here, to make the effect large) changes nothing.
    plain = corda_adapter(tiny_model_dir, tmp_path / "plain", None)
    padded = corda_adapter(tiny_model_dir, tmp_path / "padded", 64)
    assert sorted(plain) == sorted(padded) and plain
    for name, value in plain.items():
        torch.testing.assert_close(padded[name], value, atol=0, rtol=0, msg=name)


def test_corda_module_by_module_equals_peft_and_holds_one_full_U_at_a_time(tiny_model_dir, monkeypatch):
    import peft.tuners.lora.corda as corda
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from transformers import AutoModelForCausalLM

    from tlora.training.baselines import preprocess_corda_module_by_module

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm"))
    batches = [torch.randint(3, 260, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def calibrated(preprocess) -> dict[str, tuple[torch.Tensor, ...]]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        preprocess(model, config, lambda: [model(input_ids=ids) for ids in batches])
        return {n: (m.eigens.S_WC, m.eigens.U_WC, m.eigens.V_WC) for n, m in corda.target_modules(model, config)}

    reference = calibrated(lambda model, config, run: corda.preprocess_corda(model, config, run_model=run))
    full_at_once = []
    original = corda.collect_eigens_for_layer

    def spy(linear, config):
        eigens = original(linear, config)
        full_at_once.append(1 + sum(getattr(getattr(m, "eigens", None), "U_WC", torch.empty(0, 0)).shape[1] > config.r
                                    for _, m in corda.target_modules(model_of[0], config)))
        return eigens

    model_of = []
    monkeypatch.setattr(corda, "collect_eigens_for_layer", spy)

    def ours(model, config, run):
        model_of.append(model)
        preprocess_corda_module_by_module(model, config, run)

    result = calibrated(ours)
    assert sorted(result) == sorted(reference) and len(result) == 6
    for name, tensors in reference.items():
        for mine, theirs in zip(result[name], tensors):
            assert mine.shape == theirs.shape and torch.equal(mine, theirs), name
    assert full_at_once == [1] * 6  # the module just decomposed is the only one with its full U


def test_loraplus_refuses_a_deepspeed_optimizer_block(tiny_model_dir, tmp_path):
    from peft import TaskType
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from tlora.training.core import parse_training_arguments
    from training_helpers import DS_CONFIG

    from tlora.training.methods import MethodContext
    from tlora.training.registry import build_method

    config = json.loads(DS_CONFIG.read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    with_optimizer = tmp_path / "ds_with_optimizer.json"
    with_optimizer.write_text(json.dumps(config))
    try:
        for deepspeed_config, refused in ((with_optimizer, True), (DS_CONFIG, False)):
            _, _, method_args, training_args = parse_training_arguments(
                MATH, tiny_run_arguments(tiny_model_dir, tmp_path, "loraplus", "--deepspeed", str(deepspeed_config), "--bf16", "false")
            )
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            context = MethodContext(model, method_args, training_args, TaskType.CAUSAL_LM, None, tmp_path, 1)
            if refused:
                with pytest.raises(ValueError, match=r"ds_with_optimizer\.json has an 'optimizer' block"):
                    build_method(context)
            else:
                assert build_method(context).optimizer_factory is not None
    finally:
        unset_hf_deepspeed_config()


def _rank_pattern_on_rank(rank: int, world_size: int, port: int, differ: bool, report: str) -> None:
    """One rank of a gloo group that checks an EVA rank pattern (rank 1's differs when `differ`)."""
    from tlora.training.baselines import check_rank_pattern_across_ranks
    from training_helpers import report_on_gloo_rank

    pattern = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.up_proj": 4}
    if differ and rank == 1:
        pattern["model.layers.0.mlp.up_proj"] = 5
    report_on_gloo_rank(rank, world_size, port, report, lambda: check_rank_pattern_across_ranks(pattern, "EVA"), "agreed")


@pytest.mark.parametrize("differ", [False, True])
def test_eva_rank_patterns_are_checked_against_rank_0(differ, tmp_path):
    report = tmp_path / "report"
    torch.multiprocessing.spawn(_rank_pattern_on_rank, args=(2, free_port(), differ, str(report)), nprocs=2, join=True)
    messages = [report.with_suffix(f".{rank}").read_text() for rank in range(2)]
    if not differ:
        assert messages == ["agreed", "agreed"]
    else:
        assert all("EVA: the ranks derived different rank patterns" in m for m in messages)
        assert "['model.layers.0.mlp.up_proj']" in messages[1] and "at 1 modules" in messages[1]


def test_eva_refuses_calibration_batches_with_fewer_tokens_than_its_largest_rank():
    from tlora.training.baselines import check_eva_batches

    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 3, 4, -100, -100]])  # 5 labelled tokens
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "labels": labels}
    check_eva_batches([batch], needed=5, token_labels=True)
    with pytest.raises(ValueError, match=r"r x rho = 6 tokens per calibration batch, but batch 0 has 5"):
        check_eva_batches([batch], needed=6, token_labels=True)
    check_eva_batches([batch], needed=8, token_labels=False)  # sequence labels: the attention mask counts (8)
    with pytest.raises(ValueError, match="raise --calibration_batch_size"):
        check_eva_batches([batch, {**batch, "attention_mask": torch.zeros(2, 5, dtype=torch.long)}], 8, False)
