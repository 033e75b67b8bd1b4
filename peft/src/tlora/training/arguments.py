"""Command-line arguments of the training scripts: `transformers.HfArgumentParser` dataclasses plus task defaults.

Every `transformers.TrainingArguments` flag (including `--deepspeed`, `--bf16`, `--report_to`,
`--resume_from_checkpoint`) is accepted as Hugging Face users expect. A task script only changes defaults through
`TaskDefaults`; the options and their meaning are the same for every task.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, get_args, get_origin, get_type_hints

from peft import LoraConfig
from transformers import HfArgumentParser, TrainingArguments

from ..config import TLoRAConfig
from ..methods_table import METHOD_NAMES

logger = logging.getLogger(__name__)

METHODS = METHOD_NAMES
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelArguments:
    """Which base model to adapt and how to load it."""

    base_model: str = field(
        default="meta-llama/Llama-2-7b-hf",
        metadata={"help": "Hub id or local directory of the base model (and its tokenizer)."},
    )
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local directory of the tokenizer. Default: --base_model."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the base model is loaded in: 'auto' (bfloat16 with --bf16, float16 with --fp16, else "
            "float32; float32 for --method full without DeepSpeed), 'float32', 'bfloat16' or 'float16'.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow code shipped with the model or tokenizer to run. Off unless you trust the source."},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel passed to from_pretrained, e.g. 'sdpa' or 'flash_attention_2'."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base model quantised to 4 bits with bitsandbytes (QLoRA); the adapter stays in "
                  "the compute dtype. Needs `pip install bitsandbytes`."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base model quantised to 8 bits with bitsandbytes (LLM.int8())."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type with --load_in_4bit.", "choices": ["nf4", "fp4"]}
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other; pass one of them")
        check_model_location("--base_model", self.base_model)
        if self.tokenizer:
            check_model_location("--tokenizer", self.tokenizer)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def check_model_location(option: str, value: str) -> None:
    """Raise when `value` is written as a local path (or names a file) but is not a folder on this machine."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ValueError(f"{option} {value}: this is a file, not a model folder; pass the folder that holds config.json")
    if value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        raise ValueError(
            f"{option} {value}: no such folder on this machine, and it is not a Hugging Face hub id ('org/name'); "
            "check the path"
        )


@dataclass
class DataArguments:
    """Where the training rows come from and how they become token sequences."""

    data_path: str = field(
        default="meta-math/MetaMathQA",
        metadata={"help": "Local .json / .jsonl / .parquet file, or a Hugging Face Hub dataset id."},
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration (subset) name of a hub dataset, e.g. 'sst2' for GLUE."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset to train on."})
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Train on the first N rows only (the paper: the first 100k). Default: all."}
    )
    dataset_field: list[str] = field(
        default_factory=lambda: ["query", "response"],
        metadata={
            "help": "Column names: instruction and response (generation tasks); text and label, or text, text pair "
            "and label (nlu_train.py)."
        },
    )
    input_field: Optional[str] = field(
        default=None,
        metadata={
            "help": "Optional column with extra context (commonsense: 'input'); when a row has it non-empty the "
            "prompt gets an '### Input:' section."
        },
    )
    cutoff_len: int = field(default=512, metadata={"help": "Truncate every tokenized example to this many tokens."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split (hub) or file (local) to evaluate on at the end; nlu_train.py reports accuracy. "
                  "Several as NAME=SPLIT,NAME=SPLIT: metrics eval_NAME_loss, ... in the run record."},
    )


@dataclass
class _MethodArgumentsBase:
    """The fine-tuning method and its hyper-parameters, but the TLoRA options (see `MethodArguments`)."""

    method: str = field(default="tlora", metadata={"help": "Fine-tuning method.", "choices": list(METHODS)})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank r (TLoRA: the nominal rank; AdaLoRA: init_r)."})
    lora_alpha: float = field(default=128, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={
            "help": "Module names (or suffixes) that get an adapter; comma- or space-separated; 'all-linear' for "
            "every linear layer but the head."
        },
    )
    calibration_samples: int = field(
        default=256,
        metadata={
            "help": "Rows the data-driven methods (tlora, corda, eva, loraga) calibrate on, drawn as --calibration_draw "
            "says with --seed."
        },
    )
    calibration_draw: str = field(
        default="training_set",
        metadata={
            "help": "How the calibration rows are drawn. 'dataset': as the authors' scripts do, every row of the data "
            "file or split (before --max_samples) permuted with --seed (datasets' Dataset.shuffle(seed)) and the first "
            "N taken, so they may lie outside the training subset (the task scripts' default). 'training_set': the "
            "tokenized training examples shuffled with --seed, first N taken.",
            "choices": ["dataset", "training_set"],
        },
    )
    calibration_batch_size: int = field(
        default=8,
        metadata={"help": "Batch size of the calibration passes (CorDA always uses 1: its hooks need it)."},
    )
    global_batch_size: int = field(
        default=0,
        metadata={
            "help": "Total batch size across devices and accumulation (paper: 128; commonsense 32). When > 0, "
            "gradient_accumulation_steps = global_batch_size / (per_device_train_batch_size x world size). A "
            "--gradient_accumulation_steps you pass wins over a task's default global batch size; passing both "
            "flags with different results is an error. 0: use --gradient_accumulation_steps as given."
        },
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write the merged full model and tokenizer to <output_dir>/merged (ready for vLLM)."},
    )
    # ----- TLoRA (the TLoRAConfig fields are added below, see `tlora_option_fields`) -----
    statistics_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "TLoRA: safetensors file to reuse calibration statistics from (written if absent; reused only "
            "for the same calibration rows and seed, decided by rank 0)."
        },
    )
    # ----- baselines -----
    loraplus_lr_ratio: float = field(default=16.0, metadata={"help": "LoRA+: learning-rate ratio lr_B / lr_A."})
    adalora_target_r: Optional[int] = field(
        default=None, metadata={"help": "AdaLoRA: target average rank (default lora_r / 2; init_r is lora_r)."}
    )
    adalora_tinit: float = field(
        default=0.1, metadata={"help": "AdaLoRA: initial warm-up without pruning, as a fraction (<1) or steps (>=1)."}
    )
    adalora_tfinal: float = field(
        default=0.2, metadata={"help": "AdaLoRA: final fine-tuning with fixed ranks, as a fraction (<1) or steps."}
    )
    adalora_delta_t: int = field(default=10, metadata={"help": "AdaLoRA: steps between two budget allocations."})
    pissa_niter: int = field(
        default=0, metadata={"help": "PiSSA: 0 = exact SVD ('pissa'); N > 0 = fast SVD with N iterations."}
    )
    corda_method: str = field(
        default="ipm", metadata={"help": "CorDA mode: 'ipm' (instruction-previewed) or 'kpm'.", "choices": ["ipm", "kpm"]}
    )
    eva_rho: float = field(default=2.0, metadata={"help": "EVA: rank redistribution factor rho."})
    eva_tau: float = field(default=0.99, metadata={"help": "EVA: cosine-similarity threshold for convergence."})
    eva_max_passes: int = field(
        default=10,
        metadata={
            "help": "EVA: at most this many passes over the calibration samples; PEFT's loop has no limit, so "
            "components not converged by then are used as they are (recorded in the run record)."
        },
    )
    loraga_direction: str = field(
        default="ArB2r",
        metadata={"help": "LoRA-GA direction.", "choices": ["ArBr", "A2rBr", "ArB2r", "random"]},
    )
    loraga_scale: str = field(
        default="stable",
        metadata={"help": "LoRA-GA scale.", "choices": ["stable", "weight_svd", "gd_scale", "unit"]},
    )

    def __post_init__(self):
        self.target_modules = split_names(self.target_modules)
        if self.lora_r <= 0:
            raise ValueError(f"--lora_r must be positive, got {self.lora_r}")
        if self.calibration_samples <= 0:
            raise ValueError(f"--calibration_samples must be positive, got {self.calibration_samples}")
        if self.calibration_batch_size <= 0:
            raise ValueError(f"--calibration_batch_size must be positive, got {self.calibration_batch_size}")


def tlora_option_fields() -> list[tuple[str, Any, Any]]:
    """The TLoRA options of the command line: every `TLoRAConfig` field that plain `LoraConfig` lacks (but those
    marked `"cli": False`), with its default and help; a Literal type becomes a string with its values as choices."""
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    hints = get_type_hints(TLoRAConfig)
    options = []
    for config_field in dataclasses.fields(TLoRAConfig):
        if config_field.name in lora_fields or not config_field.init or config_field.metadata.get("cli") is False:
            continue
        kind, metadata = hints[config_field.name], {"help": "TLoRA: " + config_field.metadata.get("help", "")}
        if get_origin(kind) is Literal:
            kind, metadata["choices"] = str, list(get_args(kind))
        options.append((config_field.name, kind, field(default=config_field.default, metadata=metadata)))
    return options


MethodArguments = dataclasses.make_dataclass(
    "MethodArguments", tlora_option_fields(), bases=(_MethodArgumentsBase,), namespace={"__module__": __name__}
)
MethodArguments.__doc__ = """The fine-tuning method and its hyper-parameters (PEFT's reference implementation of each); the
TLoRA options are `TLoRAConfig`'s own fields (`tlora_option_fields`)."""
TLORA_OPTIONS: tuple[str, ...] = tuple(name for name, _, _ in tlora_option_fields())


def tlora_options(arguments: Any) -> dict[str, Any]:
    """The values of the TLoRA options in `arguments`, as `TLoRAConfig` keyword arguments."""
    return {name: getattr(arguments, name) for name in TLORA_OPTIONS}


def split_names(names: Sequence[str]) -> list[str]:
    """Flatten ['q_proj,k_proj', 'v_proj'] into ['q_proj', 'k_proj', 'v_proj']."""
    flat = [part.strip() for name in names for part in str(name).split(",")]
    return [name for name in flat if name]


@dataclass
class TaskDefaults:
    """What distinguishes one training script from another: its data fields and the paper's hyper-parameters."""

    name: str
    kind: str = "causal_lm"  # "causal_lm" or "sequence_classification"
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class TLoRATrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with the output-folder guard's flag (transformers 5 dropped its own) and a
    positive batch size checked at parsing."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write this run into an --output_dir that already holds another run (run record, adapter, plan "
            "or checkpoints); without it such a folder is refused unless --resume_from_checkpoint is given."
        },
    )

    def __post_init__(self):
        for option in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, option) <= 0:
                raise ValueError(f"--{option} must be a positive number of examples, got {getattr(self, option)}")
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, MethodArguments, TLoRATrainingArguments)


def paper_defaults(**overrides: Any) -> dict[str, Any]:
    """The paper's set-up (Llama-2-7B, r = alpha = 128, 1 epoch, lr 2e-5, cosine, 3 % warm-up, batch 128 of
    micro-batches of 8, cut-off 512, bf16 where the GPU supports it, calibration rows drawn as the authors' scripts
    draw them), updated with a task's `overrides`."""
    import torch

    defaults: dict[str, Any] = {
        "base_model": "meta-llama/Llama-2-7b-hf",
        "lora_r": 128,
        "lora_alpha": 128,
        "cutoff_len": 512,
        "global_batch_size": 128,
        "per_device_train_batch_size": 8,
        "calibration_draw": "dataset",
        "learning_rate": 2e-5,
        "num_train_epochs": 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_steps": 500,
        "save_total_limit": 2,
        "report_to": "none",
        "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    defaults.update(overrides)
    return defaults


def build_parser(task: TaskDefaults) -> HfArgumentParser:
    """An `HfArgumentParser` over all argument classes whose defaults are the task's."""
    parser = HfArgumentParser(ARGUMENT_CLASSES, description=task.description or None)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(task.defaults) - known)
    if unknown:
        raise ValueError(f"task {task.name!r} sets defaults for unknown options: {unknown}")
    parser.set_defaults(**task.defaults)
    return parser


def parse_arguments(
    task: TaskDefaults, argv: Optional[Sequence[str]] = None
) -> tuple[ModelArguments, DataArguments, MethodArguments, TrainingArguments]:
    """Parse `argv` (default: sys.argv) into the four argument dataclasses, with the task's defaults."""
    parser = build_parser(task)
    model_args, data_args, method_args, training_args = parser.parse_args_into_dataclasses(
        args=list(argv) if argv is not None else None
    )
    if "{method}" in str(training_args.output_dir):
        training_args.output_dir = str(training_args.output_dir).format(method=method_args.method)
    return model_args, data_args, method_args, training_args


def given_options(task: TaskDefaults, argv: Sequence[str]) -> set[str]:
    """The options present on the command line (as argparse reads it: abbreviations and --opt=value included)."""
    parser = build_parser(task)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    namespace, _ = parser.parse_known_args(list(argv))
    return set(vars(namespace))


def resolve_accumulation(
    given: set[str], global_batch_size: int, per_device_batch_size: int, accumulation_steps: int, world_size: int
) -> int:
    """The gradient_accumulation_steps of the run: a flag the user set wins over a task default, and only two flags the
    user set can contradict each other.

    * --gradient_accumulation_steps given, --global_batch_size not: the accumulation steps as given;
    * --global_batch_size > 0 given: global / (per-device batch x processes), which must divide exactly and agree
      with a --gradient_accumulation_steps also given;
    * neither given: the task's default global batch size, rounded to whole accumulation steps if the per-device
      batch size does not divide it (with a warning).
    """
    per_step = per_device_batch_size * world_size
    user_global = "global_batch_size" in given
    user_accumulation = "gradient_accumulation_steps" in given
    if global_batch_size <= 0 or (user_accumulation and not user_global):
        return accumulation_steps
    if global_batch_size % per_step:
        if user_global:
            raise ValueError(
                f"--global_batch_size {global_batch_size} is not a multiple of per_device_train_batch_size "
                f"{per_device_batch_size} x {world_size} processes; change one of them, or pass "
                "--gradient_accumulation_steps instead"
            )
        steps = max(1, round(global_batch_size / per_step))
        logger.warning(
            "The task's default global batch size %d is not a multiple of %d (per-device batch %d x %d processes); "
            "using %d accumulation steps, a global batch of %d. Pass --global_batch_size or "
            "--gradient_accumulation_steps to choose.",
            global_batch_size, per_step, per_device_batch_size, world_size, steps, steps * per_step,
        )
        return steps
    steps = global_batch_size // per_step
    if user_global and user_accumulation and steps != accumulation_steps:
        raise ValueError(
            f"--gradient_accumulation_steps {accumulation_steps} contradicts --global_batch_size {global_batch_size} "
            f"(which needs {steps} with {world_size} processes of batch {per_device_batch_size}); pass only one of them"
        )
    return steps


def describe_global_batch(training_args: TrainingArguments) -> str:
    """'global batch 128 = 8 per device x 2 processes x 8 accumulation steps'."""
    per_device = training_args.per_device_train_batch_size
    processes = max(1, training_args.world_size)
    steps = training_args.gradient_accumulation_steps
    return (
        f"global batch {per_device * processes * steps} = {per_device} per device x {processes} processes x {steps} "
        "accumulation steps"
    )
