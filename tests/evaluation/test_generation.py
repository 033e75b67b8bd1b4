"""Generation backends: HF greedy decoding is exact, batched, deterministic, stops at stop strings; vLLM is optional."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from tlora.evaluation.generation import (
    CallableBackend,
    GenerationBackend,
    GenerationSettings,
    HFBackend,
    VLLMBackend,
    make_backend,
    truncate_at_stop,
)
from tlora.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, format_prompt

PROMPTS = [
    format_prompt("What is 2 + 2?"),
    "short",
    format_prompt("A longer question about ducks, eggs and the farmers' market, to make the batch ragged."),
]


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir) -> HFBackend:
    """The HF backend on the tiny saved model."""
    return make_backend(str(tiny_model_dir), "hf", dtype="float32", device="cpu")


def greedy_reference(backend: HFBackend, prompt: str, steps: int) -> str:
    """Greedy decoding by hand: argmax of the full forward pass, one token at a time."""
    ids = backend.tokenizer(prompt, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            next_id = backend.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return backend.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_alpaca_prompt_is_the_papers_template():
    assert format_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nQ?\n\n### Response:"
    )
    assert format_prompt("Q?", "   ") == ALPACA_PROMPT.format(instruction="Q?")
    assert format_prompt("Q?", "context") == ALPACA_PROMPT_WITH_INPUT.format(instruction="Q?", input="context")
    assert "### Input:\ncontext\n\n### Response:" in format_prompt("Q?", "context")
    assert format_prompt("{braces} stay").count("{braces}") == 1


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("The answer is: 4\n\n### Instruction:\nnext", ["### Instruction"], "The answer is: 4\n\n"),
        ("abc", ["x"], "abc"),
        ("a STOP b END", ["END", "STOP"], "a "),
        ("abc", [], "abc"),
        ("abc", [""], "abc"),
    ],
)
def test_truncate_at_stop_cuts_before_the_earliest_stop_string(text, stop, expected):
    assert truncate_at_stop(text, stop) == expected


def test_callable_backend_applies_stop_strings_and_is_a_backend():
    backend = CallableBackend(lambda prompt: prompt.upper() + " Below is an instruction ...")
    assert isinstance(backend, GenerationBackend)
    settings = GenerationSettings(stop=["Below is an instruction"])
    assert backend.generate(["a", "b"], settings) == ["A ", "B "]


def test_hf_greedy_matches_step_by_step_argmax(hf_backend):
    settings = GenerationSettings(max_new_tokens=12, batch_size=1)
    for prompt in PROMPTS:
        completion = hf_backend.generate([prompt], settings)[0]
        assert completion == greedy_reference(hf_backend, prompt, 12)
        assert len(hf_backend.tokenizer(completion, add_special_tokens=False).input_ids) == 12


def test_hf_batched_left_padded_equals_one_by_one_and_is_deterministic(hf_backend):
    settings = GenerationSettings(max_new_tokens=10, batch_size=3)
    batched = hf_backend.generate(PROMPTS, settings)
    single = [
        hf_backend.generate([prompt], GenerationSettings(max_new_tokens=10, batch_size=1))[0] for prompt in PROMPTS
    ]
    assert batched == single
    assert hf_backend.generate(PROMPTS, settings) == batched
    assert hf_backend.tokenizer.padding_side == "right", "the backend restores the tokenizer's padding side"


def test_hf_stops_each_sequence_at_its_stop_string(hf_backend, monkeypatch):
    free = hf_backend.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=30))[0]
    stop = free[8:11]
    assert stop and stop not in free[:8]
    calls = []
    original_forward = hf_backend.model.forward
    monkeypatch.setattr(hf_backend.model, "forward", lambda *a, **k: calls.append(1) or original_forward(*a, **k))
    stopped = hf_backend.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=30, stop=[stop]))[0]
    assert stopped == free[: free.index(stop)]
    assert len(calls) < 30, "generation ends when the stop string appears, not at max_new_tokens"


def test_hf_sampling_is_reproducible_with_a_seed(hf_backend):
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert hf_backend.generate(PROMPTS[:2], settings) == hf_backend.generate(PROMPTS[:2], settings)


def test_auto_backend_is_hf_unless_vllm_and_a_gpu_are_present(tiny_model_dir, monkeypatch):
    from tlora.evaluation import generation

    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM not installed
    assert not generation.vllm_available()
    backend = make_backend(str(tiny_model_dir), "auto", device="cpu", tensor_parallel_size=2, work_dir="unused")
    assert isinstance(backend, HFBackend)
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    chosen = []
    monkeypatch.setattr(generation, "VLLMBackend", lambda *args, **kwargs: chosen.append(kwargs) or "vllm backend")
    assert make_backend(str(tiny_model_dir), "auto", device="cpu", tensor_parallel_size=2) == "vllm backend"
    assert chosen[0]["tensor_parallel_size"] == 2 and "device" not in chosen[0]


def test_unknown_backend_and_missing_vllm_are_clear_errors(tiny_model_dir, monkeypatch):
    with pytest.raises(ValueError, match="Unknown backend"):
        make_backend(str(tiny_model_dir), "onnx")
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        make_backend(str(tiny_model_dir), "vllm")


class FakeLLM:
    """Records what vLLM would be asked; answers every prompt with a fixed text containing a stop string."""

    instances: list = []

    def __init__(self, **options):
        self.options = options
        self.calls = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        text = "The answer is: 4\n### Instruction: more"
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]) for _ in prompts]


def test_vllm_backend_merges_adapters_and_passes_identical_settings(tiny_adapter_dir, tmp_path, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **options: types.SimpleNamespace(**options)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    backend = make_backend(str(tiny_adapter_dir), "vllm", dtype="float32", work_dir=str(tmp_path), device="cpu")
    assert isinstance(backend, VLLMBackend)
    llm = FakeLLM.instances[-1]
    assert llm.options["model"].startswith(str(tmp_path)), "an adapter is merged into work_dir for vLLM"
    assert llm.options["tensor_parallel_size"] == 2, "3 GPUs do not divide 4 heads: the largest divisor is used"
    assert llm.options["trust_remote_code"] is False
    settings = GenerationSettings(max_new_tokens=7, stop=["### Instruction"])
    assert backend.generate(["p1", "p2"], settings) == ["The answer is: 4\n", "The answer is: 4\n"]
    params = llm.calls[-1][1]
    assert (params.temperature, params.top_p, params.max_tokens, params.stop) == (0.0, 1.0, 7, ["### Instruction"])


class FakeLoRALLM(FakeLLM):
    """FakeLLM that also records the LoRA request of each generate call."""

    def generate(self, prompts, params, lora_request=None):
        self.lora_requests = getattr(self, "lora_requests", []) + [lora_request]
        return super().generate(prompts, params)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in vLLM module (LLM, SamplingParams, lora.request.LoRARequest) on a machine with 1 GPU."""
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLoRALLM
    fake.SamplingParams = lambda **options: types.SimpleNamespace(**options)
    request_module = types.ModuleType("vllm.lora.request")
    request_module.LoRARequest = lambda **fields: types.SimpleNamespace(**fields)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request_module)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return fake


@pytest.fixture(scope="module")
def patterned_adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with per-module ranks and alphas (as TLoRA saves them) and non-zero B, without a tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 10},
        alpha_pattern={"q_proj": 12},
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("patterned_adapter")
    model.save_pretrained(directory)
    return directory


def test_vllm_backend_serves_a_patterned_adapter_unmerged_through_its_export(
    patterned_adapter_dir, tiny_model_dir, tmp_path, fake_vllm
):
    import json

    backend = make_backend(str(patterned_adapter_dir), "vllm", serve_adapter=True, work_dir=str(tmp_path))
    llm = FakeLoRALLM.instances[-1]
    assert (llm.options["model"], llm.options["tokenizer"]) == (str(tiny_model_dir), str(tiny_model_dir))
    assert (llm.options["enable_lora"], llm.options["max_lora_rank"], llm.options["max_loras"]) == (True, 16, 1)
    lora_path = backend.lora_request.lora_path
    assert lora_path.startswith(str(tmp_path)) and lora_path.endswith("-rauto"), "exported into the work dir"
    exported = json.loads((tmp_path / lora_path.rsplit("/", 1)[-1] / "adapter_config.json").read_text())
    assert (exported["r"], exported["rank_pattern"], exported["alpha_pattern"]) == (16, {}, {})
    assert not any(path.name.startswith("merged-") for path in tmp_path.iterdir()), "nothing is merged"
    assert backend.generate(["p1"], GenerationSettings(max_new_tokens=3)) == ["The answer is: 4\n### Instruction: more"]
    assert llm.lora_requests[-1] is backend.lora_request and backend.lora_request.lora_int_id == 1
    written = (tmp_path / lora_path.rsplit("/", 1)[-1] / "adapter_model.safetensors").stat().st_mtime_ns
    again = make_backend(str(patterned_adapter_dir), "vllm", serve_adapter=True, work_dir=str(tmp_path))
    assert again.lora_request.lora_path == lora_path
    assert (tmp_path / lora_path.rsplit("/", 1)[-1] / "adapter_model.safetensors").stat().st_mtime_ns == written


def test_vllm_backend_serves_a_plain_adapter_from_its_own_folder(tiny_adapter_dir, tmp_path, fake_vllm):
    backend = make_backend(str(tiny_adapter_dir), "vllm", serve_adapter=True, max_lora_rank=64, work_dir=str(tmp_path))
    llm = FakeLoRALLM.instances[-1]
    assert backend.lora_request.lora_path == str(tiny_adapter_dir), "no patterns: vLLM reads the adapter as saved"
    assert llm.options["max_lora_rank"] == 64 and list(tmp_path.iterdir()) == []


def test_vllm_serving_options_are_checked_before_vllm_starts(tiny_model_dir, tiny_adapter_dir, tmp_path, fake_vllm):
    import json
    import shutil

    from tlora.evaluation.models import ModelResolutionError
    from tlora.export import AdapterExportError

    FakeLoRALLM.instances.clear()
    with pytest.raises(ModelResolutionError, match="is a merged model; point --model at the adapter folder"):
        make_backend(str(tiny_model_dir), "vllm", serve_adapter=True, work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--max_lora_rank applies to --serve_adapter only"):
        make_backend(str(tiny_adapter_dir), "vllm", max_lora_rank=16, work_dir=str(tmp_path))
    with pytest.raises(AdapterExportError, match="max_lora_rank 12 is not one vLLM accepts"):
        make_backend(str(tiny_adapter_dir), "vllm", serve_adapter=True, max_lora_rank=12, work_dir=str(tmp_path))
    pissa = tmp_path / "pissa_adapter"
    shutil.copytree(tiny_adapter_dir, pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(AdapterExportError, match="init_lora_weights='pissa': it applies to a base model PEFT modified"):
        make_backend(str(pissa), "vllm", serve_adapter=True, work_dir=str(tmp_path / "work"))
    assert FakeLoRALLM.instances == []


def test_serve_adapter_flags_reach_the_backend_options():
    from transformers import HfArgumentParser

    from tlora.evaluation.common import GeneratorArguments

    (arguments,) = HfArgumentParser(GeneratorArguments).parse_args_into_dataclasses(
        ["--model", "run", "--serve_adapter", "--max_lora_rank", "64"]
    )
    options = arguments.backend_options()
    assert (options["serve_adapter"], options["max_lora_rank"]) == (True, 64)
    (default,) = HfArgumentParser(GeneratorArguments).parse_args_into_dataclasses(["--model", "run"])
    assert "serve_adapter" not in default.backend_options() and "max_lora_rank" not in default.backend_options()
