"""Generation backends for evaluation: vLLM (optional, GPU) and Hugging Face `generate`, with identical semantics.

Both backends take the same `GenerationSettings`: greedy decoding when `temperature == 0`, at most `max_new_tokens`
new tokens, generation ends at EOS or at the first stop string, and the completion is cut just before that stop
string. vLLM is imported only inside `VLLMBackend`, so nothing else needs it installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from .models import load_model_and_tokenizer, merged_model_dir, served_adapter
from .protocols import ROBUST_STOP_STRINGS, truncate_at_stop

logger = logging.getLogger(__name__)

# The robust protocol's stop strings (the paper protocol's are `protocols.PAPER_STOP_STRINGS`).
DEFAULT_STOP_STRINGS = ROBUST_STOP_STRINGS

BACKENDS = ("auto", "hf", "vllm")


@dataclass
class GenerationSettings:
    """Decoding settings shared by every backend."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    batch_size: int = 16
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0)."""
        return self.temperature <= 0.0


def generation_settings(
    max_new_tokens: int,
    stop: Optional[Sequence[str]] = None,
    *,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
) -> GenerationSettings:
    """The settings every task decodes with: a token limit, stop strings (default: the robust protocol's) and a
    temperature (greedy unless given), top_p 1."""
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        stop=list(ROBUST_STOP_STRINGS if stop is None else stop),
        batch_size=batch_size,
        seed=seed,
    )


@runtime_checkable
class GenerationBackend(Protocol):
    """Anything that turns prompts into completions (completions exclude the prompt and the stop string)."""

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """One completion per prompt, in the order of `prompts`."""
        ...


def backend_name(backend: object) -> str:
    """A short name of a backend for records ("hf", "vllm", "callable", or the class name)."""
    return getattr(backend, "name", type(backend).__name__)


class CallableBackend:
    """A backend around a python function `prompt -> text` (for tests and for replaying stored generations)."""

    name = "callable"

    def __init__(self, function: Callable[[str], str], name: Optional[str] = None) -> None:
        self.function = function
        if name is not None:
            self.name = name

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Apply the function to each prompt and cut at the stop strings, like the real backends."""
        return [truncate_at_stop(self.function(prompt), settings.stop) for prompt in prompts]


class HFBackend:
    """Batched `transformers` generation: left padding, per-sequence stop strings and EOS, greedy when temperature 0."""

    name = "hf"

    def __init__(
        self,
        model_path: Optional[str] = None,
        *,
        model=None,
        tokenizer=None,
        dtype: str = "auto",
        device: Optional[str] = None,
        trust_remote_code: bool = False,
        base_model: Optional[str] = None,
    ) -> None:
        if model is None or tokenizer is None:
            if model_path is None:
                raise ValueError("HFBackend needs either model_path or both model and tokenizer.")
            model, tokenizer = load_model_and_tokenizer(
                model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, base_model=base_model
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer

    def _prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """The token count of each prompt (to batch prompts of similar length together)."""
        return [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Completions for `prompts`, generated in batches of `settings.batch_size`, returned in input order."""
        if not prompts:
            return []
        lengths = self._prompt_lengths(prompts)
        order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
        completions: list[Optional[str]] = [None] * len(prompts)
        batch_size = max(1, settings.batch_size)
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating (hf)", disable=len(batches) < 2):
            texts = self._generate_batch([prompts[index] for index in batch], settings)
            for index, text in zip(batch, texts):
                completions[index] = text
        return [text or "" for text in completions]

    def _generate_batch(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Completions for one left-padded batch."""
        previous_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = previous_side
        device = next(self.model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items() if key in ("input_ids", "attention_mask")}
        options = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=not settings.greedy,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if settings.greedy:
            options.update(temperature=None, top_p=None, top_k=None)
        else:
            options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=None)
        stop = [stop_string for stop_string in settings.stop if stop_string]
        if stop:
            options.update(stop_strings=stop, tokenizer=self.tokenizer)
        torch.manual_seed(settings.seed)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(text, stop) for text in texts]


def _largest_usable_parallelism(device_count: int, model_dir: str) -> int:
    """The GPU count, lowered to the largest value that divides the model's attention heads (vLLM requires it)."""
    import json

    config_path = os.path.join(model_dir, "config.json")
    if device_count <= 1 or not os.path.isfile(config_path):
        return max(1, device_count)
    with open(config_path, encoding="utf-8") as handle:
        heads = json.load(handle).get("num_attention_heads")
    if not heads:
        return device_count
    size = device_count
    while heads % size:
        size -= 1
    if size != device_count:
        logger.warning(
            "Using tensor_parallel_size=%d: %d GPUs do not divide %d attention heads", size, device_count, heads
        )
    return size


class VLLMBackend:
    """vLLM offline generation (greedy, batched by vLLM) on all visible GPUs; adapters are merged first, or served
    unmerged as a LoRA with `serve_adapter` (exported by `tlora.export` when they have rank or alpha patterns)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        base_model: Optional[str] = None,
        work_dir: Optional[str] = None,
        tensor_parallel_size: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: Optional[int] = None,
        seed: int = 0,
        serve_adapter: bool = False,
        max_lora_rank: Optional[int] = None,
    ) -> None:
        try:
            import vllm
        except ImportError as error:
            raise ImportError("The vLLM backend needs vLLM: `pip install vllm`, or use --backend hf.") from error

        if max_lora_rank is not None and not serve_adapter:
            raise ValueError("--max_lora_rank applies to --serve_adapter only; add --serve_adapter or drop it.")
        if work_dir is None:
            work_dir = (
                os.path.join(os.path.expanduser(model_path), "merged_for_vllm")
                if os.path.isdir(os.path.expanduser(model_path))
                else os.path.join(os.getcwd(), "merged_for_vllm")
            )
        if serve_adapter:
            served = served_adapter(model_path, work_dir, base_model=base_model, max_lora_rank=max_lora_rank)
            model_dir, tokenizer = served.base_model, served.tokenizer
            options: dict = dict(enable_lora=True, max_lora_rank=served.max_lora_rank, max_loras=1)
            self.lora_request = _lora_request(served.lora_path)
        else:
            model_dir = merged_model_dir(
                model_path, work_dir, dtype=dtype, trust_remote_code=trust_remote_code, base_model=base_model
            )
            tokenizer, options, self.lora_request = model_dir, {}, None
        if tensor_parallel_size is None:
            tensor_parallel_size = _largest_usable_parallelism(torch.cuda.device_count(), model_dir)
        options.update(
            model=model_dir,
            tokenizer=tokenizer,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        logger.info("Starting vLLM on %s with tensor_parallel_size=%d", model_dir, tensor_parallel_size)
        self.sampling_params_class = vllm.SamplingParams
        self.llm = vllm.LLM(**options)

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        """Completions for `prompts` in input order (vLLM schedules its own batches)."""
        stop = [stop_string for stop_string in settings.stop if stop_string]
        params = self.sampling_params_class(
            n=1,
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            stop=stop or None,
            seed=settings.seed,
        )
        extra = {} if self.lora_request is None else {"lora_request": self.lora_request}
        outputs = self.llm.generate(prompts, params, **extra)
        return [truncate_at_stop(output.outputs[0].text, stop) for output in outputs]


def _lora_request(lora_path: str):
    """vLLM's request for the one adapter served (name "adapter", id 1)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name="adapter", lora_int_id=1, lora_path=lora_path)


def vllm_available() -> bool:
    """Whether vLLM is installed and a GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_backend(
    model_path: str,
    backend: str = "auto",
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    **kwargs,
) -> GenerationBackend:
    """The backend for `model_path`: "auto" picks vLLM when it is installed and a GPU is present, else HF."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
        logger.info("Backend 'auto' chose %s", backend)
    if backend == "vllm":
        vllm_options = {key: value for key, value in kwargs.items() if key != "device"}
        return VLLMBackend(model_path, dtype=dtype, trust_remote_code=trust_remote_code, **vllm_options)
    if kwargs.get("serve_adapter"):
        logger.info("The HF backend merges the adapter on the fly; --serve_adapter applies to vLLM only")
    hf_options = {key: value for key, value in kwargs.items() if key in ("device", "base_model", "model", "tokenizer")}
    return HFBackend(model_path, dtype=dtype, trust_remote_code=trust_remote_code, **hf_options)


__all__ = [
    "BACKENDS",
    "CallableBackend",
    "DEFAULT_STOP_STRINGS",
    "GenerationBackend",
    "GenerationSettings",
    "HFBackend",
    "VLLMBackend",
    "backend_name",
    "generation_settings",
    "make_backend",
    "truncate_at_stop",
    "vllm_available",
]
