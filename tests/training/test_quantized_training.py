"""The training scripts on a bitsandbytes base (--load_in_4bit / --load_in_8bit, on the CPU): TLoRA calibrates on
the dequantised weights, trains B through PEFT's bitsandbytes LoRA layers, and stock PEFT reloads the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlora.training import main
from tlora.training.arguments import parse_arguments
from tlora.training.core import check_quantized_method
from training_helpers import load_task, tiny_run_arguments

pytest.importorskip("bitsandbytes")
MATH = load_task("math_train.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose widths are multiples of 64 (bitsandbytes' 4-bit CPU kernels need whole blocks)."""
    from tlora.fixtures.toy import byte_tokenizer, tiny_llama

    directory = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_llama(hidden_size=64, num_layers=2, intermediate_size=128, seed=0).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def quantized_base(model_dir: Path, **flags):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **flags)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.float32, device_map="cpu")


def test_quantisation_flags_parse_and_contradictions_fail(tmp_path):
    model_args, *_ = parse_arguments(MATH, ["--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--output_dir", str(tmp_path)])
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "fp4" and not model_args.load_in_8bit
    with pytest.raises(ValueError, match="--load_in_4bit and --load_in_8bit exclude each other"):
        parse_arguments(MATH, ["--load_in_4bit", "--load_in_8bit", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--method full cannot train a base loaded with"):
        check_quantized_method(model_args, "full")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_tlora_trains_on_a_quantised_base_and_stock_peft_reloads_it(model_dir, tmp_path, flag):
    from peft import PeftModel

    output_dir = tmp_path / "run"
    record = main(MATH, tiny_run_arguments(model_dir, output_dir, "tlora", flag, "--max_steps", "3"))
    assert record["status"] == "finished"
    adapter = load_file(output_dir / "adapter_model.safetensors")
    lora_A = {k: v for k, v in adapter.items() if "lora_A" in k}
    lora_B = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_A and lora_B
    for name, A in lora_A.items():  # A: orthonormal rows from the SVD of the dequantised W C
        torch.testing.assert_close(A @ A.t(), torch.eye(A.shape[0]), atol=1e-5, rtol=0, msg=name)
    assert max(float(B.abs().max()) for B in lora_B.values()) > 0  # B was trained
    flags = {"load_in_4bit": True} if flag == "--load_in_4bit" else {"load_in_8bit": True}
    base = quantized_base(model_dir, **flags)
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        before = base(input_ids=input_ids).logits
    reloaded = PeftModel.from_pretrained(base, str(output_dir)).eval()
    with torch.no_grad():
        after = reloaded(input_ids=input_ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-6  # the trained adapter changes the quantised base's output
