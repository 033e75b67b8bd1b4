"""The training core shared by every task script: arguments -> data -> calibration -> method -> Trainer -> outputs.

    from tlora.training import TaskDefaults, main
    main(TaskDefaults(name="math", defaults={"data_path": "meta-math/MetaMathQA", "dataset_field": ["query", "response"]}))

Outputs in --output_dir: the adapter (PEFT format; the full model for `full`), the tokenizer, run_record.json, for
tlora tlora_plan.json / tlora_plan.png / tlora_init.safetensors, for olora/pissa/loraga/corda initial_adapter/ (the
adapter right after initialisation, used to convert the trained adapter for the original base model), checkpoints,
and with --merge the merged model in merged/.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..constants import MERGED_DIR, PLAN_FILE, RUN_RECORD_FILE, TLORA_INIT_FILE
from ..data.rows import RowSource, is_local_path, load_rows
from ..outputs import MERGED_STAGING_DIR, STAGING_DIR, OutputFolderError, build_manifest, publish_staged, run_artifacts
from .arguments import (
    DataArguments,
    MethodArguments,
    ModelArguments,
    TaskDefaults,
    describe_global_batch,
    given_options,
    parse_arguments,
    resolve_accumulation,
)
from .data import (
    CalibrationSet,
    ClassificationFields,
    ExampleDataset,
    InstructionFields,
    PaddingCollator,
    build_classification_dataset,
    build_instruction_dataset,
    draw_calibration_rows,
    draw_calibration_set,
    label_names,
)
from .methods import BuiltMethod, MethodContext
from .registry import BASE_MODIFYING_METHODS, CALIBRATED_METHODS, build_method
from .record import arguments_record, library_versions, write_run_record

logger = logging.getLogger(__name__)

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def _given(argv: Sequence[str], option: str) -> bool:
    """True when `option` appears on the command line (as --opt, --opt=..., or its dashed spelling)."""
    spellings = {option, option.replace("_", "-")}
    return any(arg.split("=", 1)[0] in spellings for arg in argv)


def _option_value(argv: Sequence[str], option: str) -> Optional[str]:
    """The value given to `option` on the command line (last occurrence), or None."""
    value = None
    for index, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        if name in (option, option.replace("_", "-")):
            value = inline if inline else (argv[index + 1] if index + 1 < len(argv) else None)
    return value


def prepare_deepspeed_without_gpu(argv: Sequence[str]) -> list[str]:
    """Make `deepspeed --num_gpus N script.py --deepspeed ...` work on a machine without an accelerator.

    DeepSpeed's CPU accelerator communicates through 'gloo' (or 'ccl' when oneCCL's torch bindings are installed).
    Accelerate, which the Trainer uses, only picks a backend for DeepSpeed when it finds a GPU-like device; without
    one its PartialState starts DeepSpeed's process group but reports a single process, so every rank would train
    alone with a wrong batch size. Here the state is created up front with DeepSpeed's own backend and the Trainer is
    told to use it (accelerator_config use_configured_state). Nothing changes when an accelerator is present.
    """
    argv = list(argv)
    if _option_value(argv, "--deepspeed") is None or int(os.environ.get("LOCAL_RANK", "-1")) < 0:
        return argv
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return argv
    if _given(argv, "--accelerator_config"):
        raise ValueError(
            "--accelerator_config cannot be combined with --deepspeed on a machine without GPUs: the training core "
            "configures Accelerate itself there (see tlora.training.core.prepare_deepspeed_without_gpu)"
        )
    from datetime import timedelta

    from accelerate import PartialState

    timeout = timedelta(seconds=int(_option_value(argv, "--ddp_timeout") or 1800))
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend=accelerator.communication_backend_name(), timeout=timeout)
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    logger.info(
        "DeepSpeed without GPUs: %d processes over %s.", state.num_processes, accelerator.communication_backend_name()
    )
    return argv + ["--accelerator_config", '{"use_configured_state": true}']


def parse_training_arguments(
    task: TaskDefaults, argv: Optional[Sequence[str]] = None
) -> tuple[ModelArguments, DataArguments, MethodArguments, TrainingArguments]:
    """Parse the command line and settle gradient_accumulation_steps (see `resolve_accumulation`); the resulting
    global batch size is stored in --global_batch_size."""
    argv = prepare_deepspeed_without_gpu(sys.argv[1:] if argv is None else argv)
    model_args, data_args, method_args, training_args = parse_arguments(task, argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = training_args.per_device_train_batch_size
    accumulation = resolve_accumulation(
        given_options(task, argv), method_args.global_batch_size, per_device, training_args.gradient_accumulation_steps, world_size
    )
    if accumulation != training_args.gradient_accumulation_steps:
        # Parse again so that TrainingArguments (and a DeepSpeed config's "auto" values) see the final value.
        argv = argv + ["--gradient_accumulation_steps", str(accumulation)]
        model_args, data_args, method_args, training_args = parse_arguments(task, argv)
    method_args.global_batch_size = per_device * world_size * accumulation
    return model_args, data_args, method_args, training_args


def setup_logging(training_args: TrainingArguments) -> None:
    """transformers-style logging: INFO for tlora on the main process, warnings elsewhere (or --log_level)."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    main_level = logging.INFO if training_args.log_level == "passive" else level
    logging.getLogger("tlora").setLevel(main_level if training_args.process_index == 0 else level)
    if training_args.process_index != 0:
        datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer
# ---------------------------------------------------------------------------------------------------------------


def model_dtype(model_args: ModelArguments, training_args: TrainingArguments, method: str) -> torch.dtype:
    """The dtype the base model is loaded in ('auto': the mixed-precision dtype, except for full fine-tuning without
    DeepSpeed, which keeps float32 weights so that the optimizer does not update bf16/fp16 weights directly)."""
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    if method == "full" and not training_args.deepspeed:
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer, right-padded, with a pad token (UNK, else EOS, when it has none: padding is masked anyway)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer or model_args.base_model, trust_remote_code=model_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(model_args: ModelArguments, dtype: torch.dtype) -> Optional[Any]:
    """The bitsandbytes configuration of --load_in_4bit / --load_in_8bit (None when neither is set)."""
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type, bnb_4bit_compute_dtype=dtype
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_quantized_method(model_args: ModelArguments, method: str) -> None:
    """Refuse full fine-tuning of a quantised base before anything is loaded."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and method == "full":
        raise ValueError(
            "--method full cannot train a base loaded with --load_in_4bit/--load_in_8bit (quantised weights are "
            "frozen); choose an adapter method such as --method tlora, or drop the quantisation flag"
        )


def load_base_model(
    task: TaskDefaults,
    model_args: ModelArguments,
    dtype: torch.dtype,
    tokenizer: PreTrainedTokenizerBase,
    labels: Optional[Sequence[Any]] = None,
    *,
    device: Optional[torch.device] = None,
) -> torch.nn.Module:
    """The base model of the task (causal LM, or sequence classifier with a fresh head for `labels`); a quantised
    base is placed on `device` while loading and prepared for k-bit training as PEFT recommends."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = quantization_config(model_args, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    if task.kind == SEQUENCE_CLASSIFICATION:
        id2label = {i: str(label) for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.base_model,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **kwargs,
        )
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_args.base_model, **kwargs)
    model.config.use_cache = False
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing stays with --gradient_checkpointing (TrainingArguments), as for unquantised bases.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """The rows and tokenized training (and optional evaluation) sets of a run."""

    source: RowSource
    build: Callable[..., ExampleDataset]
    train: ExampleDataset
    evaluation: Optional[ExampleDataset | dict[str, ExampleDataset]]
    labels: Optional[list[Any]]
    origin: str


def _load_split(data_args: DataArguments, split_or_file: str, max_samples: Optional[int]) -> RowSource:
    if is_local_path(data_args.data_path):
        if not is_local_path(split_or_file):
            raise ValueError(f"with a local --data_path, --eval_split must be a file too (got {split_or_file!r})")
        return load_rows(split_or_file, max_samples=max_samples)
    return load_rows(data_args.data_path, hub_config=data_args.dataset_config, hub_split=split_or_file, max_samples=max_samples)


def evaluation_splits(value: Optional[str]) -> dict[str, str]:
    """--eval_split as {name: split or file}: one unnamed split (name ""), or `name=split,name=split` (metrics
    `eval_<name>_loss`, ...)."""
    if not value:
        return {}
    if "=" not in value:
        return {"": value}
    splits = {}
    for item in value.split(","):
        name, _, split = item.partition("=")
        name, split = name.strip(), split.strip()
        if not name.isidentifier() or not split or name in splits:
            raise ValueError(f"--eval_split {value!r}: {item!r} is not NAME=SPLIT_OR_FILE with a new NAME made of "
                             "letters, digits and underscores (or give one split without a name)")
        splits[name] = split
    return splits


def build_task_data(
    task: TaskDefaults, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, show_progress: bool
) -> TaskData:
    """Read, check and tokenize the training rows (and the evaluation rows when --eval_split is given)."""
    source = load_rows(
        data_args.data_path,
        hub_config=data_args.dataset_config,
        hub_split=data_args.dataset_split,
        max_samples=data_args.max_samples,
    )
    evaluation_sources = {name: _load_split(data_args, split, None) for name, split in evaluation_splits(data_args.eval_split).items()}
    if task.kind == SEQUENCE_CLASSIFICATION:
        fields = ClassificationFields.from_arguments(data_args.dataset_field)
        labels = label_names(source, fields.label)
        build = functools.partial(
            build_classification_dataset, fields=fields, tokenizer=tokenizer, cutoff_len=data_args.cutoff_len, labels=labels
        )
    else:
        instruction_fields = InstructionFields.from_arguments(data_args.dataset_field, data_args.input_field)
        labels = None
        build = functools.partial(
            build_instruction_dataset, fields=instruction_fields, tokenizer=tokenizer, cutoff_len=data_args.cutoff_len
        )
    train = build(source, show_progress=show_progress)
    evaluation = {name: build(rows, show_progress=show_progress) for name, rows in evaluation_sources.items()} or None
    if evaluation is not None and list(evaluation) == [""]:
        evaluation = evaluation[""]  # one unnamed split: the Trainer's plain `eval_*` metrics
    logger.info("Training on %d examples from %s.", len(train), source.origin)
    return TaskData(source, build, train, evaluation, labels, source.origin)


def draw_calibration(data: TaskData, method_args: MethodArguments, seed: int, collator: PaddingCollator) -> CalibrationSet:
    """The calibration samples of the run, drawn as --calibration_draw says."""
    if method_args.calibration_draw == "dataset":
        return draw_calibration_rows(data.source, data.build, method_args.calibration_samples, seed, collator)
    return draw_calibration_set(data.train, method_args.calibration_samples, seed, collator)


def estimate_total_steps(num_examples: int, training_args: TrainingArguments) -> int:
    """Optimizer steps the Trainer will run (as transformers counts them)."""
    if training_args.max_steps and training_args.max_steps > 0:
        return int(training_args.max_steps)
    per_device = training_args.per_device_train_batch_size
    batches = math.ceil(num_examples / (per_device * max(1, training_args.world_size)))
    accumulation = training_args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return max(1, math.ceil(training_args.num_train_epochs * per_epoch))


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


class MethodTrainer(Trainer):
    """`transformers.Trainer` whose optimizer can come from the method (LoRA+), also under DeepSpeed, and whose loss
    can be computed inside a method's context (AdaLoRA's regulariser weight)."""

    def __init__(self, *args, optimizer_factory=None, loss_context=None, **kwargs):
        self._optimizer_factory = optimizer_factory
        self._loss_context = loss_context
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """The method's optimizer when it brings one, else the Trainer's."""
        if self._optimizer_factory is not None and self.optimizer is None:
            self.optimizer = self._optimizer_factory(self.model if model is None else model, self.args)
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, inside the method's loss context when it has one."""
        if self._loss_context is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        with self._loss_context(self, num_items_in_batch):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def build_trainer(
    task: TaskDefaults,
    built: BuiltMethod,
    training_args: TrainingArguments,
    data: TaskData,
    collator: PaddingCollator,
    tokenizer: PreTrainedTokenizerBase,
    extra_callbacks: Sequence[Any] = (),
) -> MethodTrainer:
    """The Trainer of a built method: its optimizer, callbacks and loss context."""
    trainer = MethodTrainer(
        model=built.model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.evaluation,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*built.callbacks, *extra_callbacks],
        compute_metrics=_accuracy if task.kind == SEQUENCE_CLASSIFICATION else None,
        optimizer_factory=built.optimizer_factory,
        loss_context=built.loss_context,
    )
    for callback in built.callbacks:
        if hasattr(callback, "attach"):
            callback.attach(trainer)
    return trainer


def _accuracy(prediction) -> dict[str, float]:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def resolve_resume(training_args: TrainingArguments) -> Optional[str]:
    """The checkpoint to resume from: --resume_from_checkpoint PATH, or the last one in output_dir for 'true'."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() == "true":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint true: no checkpoint-* folder in {training_args.output_dir}")
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return str(value)


def check_output_dir(training_args: TrainingArguments, resume: Optional[str]) -> None:
    """Refuse an output folder that holds another run's files, unless this run resumes or --overwrite_output_dir."""
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"--output_dir {output_dir} is a file, not a folder; pass a folder for the run's outputs")
    found = run_artifacts(output_dir)
    if not found or resume is not None:
        return
    if getattr(training_args, "overwrite_output_dir", False):
        logger.warning("--overwrite_output_dir: %s holds another run (%s); this run writes over it.", output_dir, ", ".join(found))
        return
    raise OutputFolderError(
        f"--output_dir {output_dir} already holds another run: {', '.join(found)}. Pass --resume_from_checkpoint "
        "true (or a checkpoint folder) to continue that run, --overwrite_output_dir to write this run over it, or "
        "choose another --output_dir"
    )


def _save_final(trainer: Trainer, built, tokenizer, method: str, directory: Path) -> None:
    """Write the final adapter (converted for the original base when the method modified it) and the tokenizer."""
    if method in BASE_MODIFYING_METHODS and built.initial_adapter_dir is not None:
        # PEFT's conversion: delta W = B A - B0 A0 as a LoRA adapter of rank 2r for the *original* base weights.
        trainer.model.save_pretrained(
            str(directory),
            path_initial_model_for_weight_conversion=str(built.initial_adapter_dir),
            is_main_process=trainer.args.should_save,
        )
        if trainer.args.should_save:
            tokenizer.save_pretrained(str(directory))
    else:
        trainer.save_model(str(directory))


def final_manifest(staging: Path, built, method: str, output_dir: Path) -> dict[str, Any]:
    """The manifest of the final save: digests of the staged files (and of TLoRA's plan and initial A), the method
    and, for TLoRA, the fingerprint of the base weights the adapter was trained on."""
    files: dict[str, Path] = {entry.name: entry for entry in staging.iterdir() if entry.is_file()}
    fields: dict[str, Any] = {"method": method}
    if built.plan is not None:
        files.update({name: output_dir / name for name in (PLAN_FILE, TLORA_INIT_FILE) if (output_dir / name).is_file()})
        fields["base_fingerprint"] = built.details.get("base_fingerprint")
        fields["base_quantized"] = bool(built.details.get("base_quantized", False))
    return build_manifest(files, **fields)


def save_outputs(trainer: Trainer, built, tokenizer, method: str, output_dir: Path) -> None:
    """Save the final adapter and tokenizer into a staging folder inside `output_dir`, then move the files into place
    with the manifest last (tlora.outputs), so that a killed save is detected instead of leaving a mixed folder."""
    staging = output_dir / STAGING_DIR
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    trainer.accelerator.wait_for_everyone()
    _save_final(trainer, built, tokenizer, method, staging)
    trainer.accelerator.wait_for_everyone()  # every rank is done with the staging folder before it is emptied
    if trainer.args.should_save:
        publish_staged(staging, output_dir, final_manifest(staging, built, method, output_dir))
    trainer.accelerator.wait_for_everyone()


def save_merged(trainer: Trainer, tokenizer, output_dir: Path) -> Path:
    """Merge the adapter into the base weights and save a plain model with its tokenizer (for vLLM)."""
    from peft import PeftModel

    directory = output_dir / MERGED_DIR
    if trainer.args.should_save:
        staging = output_dir / MERGED_STAGING_DIR  # renamed to merged/ once complete
        if staging.exists():
            shutil.rmtree(staging)
        model = trainer.accelerator.unwrap_model(trainer.model)
        merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
        merged.config.use_cache = True
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    trainer.accelerator.wait_for_everyone()
    return directory


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def train(
    task: TaskDefaults,
    model_args: ModelArguments,
    data_args: DataArguments,
    method_args: MethodArguments,
    training_args: TrainingArguments,
) -> dict[str, Any]:
    """Run one training job and return its run record (also written to output_dir/run_record.json)."""
    started = time.perf_counter()
    setup_logging(training_args)
    is_main = training_args.process_index == 0
    logger.info("Training with a %s.", describe_global_batch(training_args))
    output_dir = Path(training_args.output_dir)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, resume)
    set_seed(training_args.seed)

    inputs = load_run_inputs(task, model_args, data_args, method_args, training_args)
    total_steps = estimate_total_steps(len(inputs.data.train), training_args)
    record = initial_record(
        task, model_args, data_args, method_args, training_args, inputs.data, inputs.calibration, resume
    )
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(output_dir, record)
    built = build_recorded_method(task, method_args, training_args, inputs, resume, total_steps, record)
    return train_and_save(task, built, method_args, training_args, inputs, resume, record, started)


@dataclass
class RunInputs:
    """What a run loads before its method is built: tokenizer, data, collator, calibration set and base model."""

    tokenizer: PreTrainedTokenizerBase
    data: TaskData
    collator: PaddingCollator
    calibration: Optional[CalibrationSet]
    model: torch.nn.Module


def load_run_inputs(
    task: TaskDefaults,
    model_args: ModelArguments,
    data_args: DataArguments,
    method_args: MethodArguments,
    training_args: TrainingArguments,
) -> RunInputs:
    """Load the tokenizer and data (main process first), draw the calibration set and load the base model."""
    is_main = training_args.process_index == 0
    with training_args.main_process_first(desc="loading the tokenizer and data"):  # one download, then the cache
        tokenizer = load_tokenizer(model_args)
        data = build_task_data(task, data_args, tokenizer, show_progress=is_main)
    collator = PaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if training_args.device.type == "cuda" else None)
    calibration = None
    if method_args.method in CALIBRATED_METHODS:
        calibration = draw_calibration(data, method_args, training_args.seed, collator)

    with training_args.main_process_first(desc="loading the base model"):
        check_quantized_method(model_args, method_args.method)
        dtype = model_dtype(model_args, training_args, method_args.method)
        model = load_base_model(task, model_args, dtype, tokenizer, data.labels, device=training_args.device)
    if not getattr(model, "is_quantized", False):  # a quantised base was placed while loading
        model.to(training_args.device)
    return RunInputs(tokenizer, data, collator, calibration, model)


def build_recorded_method(
    task: TaskDefaults,
    method_args: MethodArguments,
    training_args: TrainingArguments,
    inputs: RunInputs,
    resume: Optional[str],
    total_steps: int,
    record: dict[str, Any],
) -> BuiltMethod:
    """Build the method on the base model and add its parameters, details and timings to the run record."""
    is_main = training_args.process_index == 0
    context = MethodContext(
        model=inputs.model,
        arguments=method_args,
        training_args=training_args,
        task_type=_task_type(task),
        calibration=inputs.calibration,
        output_dir=Path(training_args.output_dir),
        total_steps=total_steps,
        resume=resume is not None,
        is_main_process=is_main,
    )
    initialization_started = time.perf_counter()
    built = build_method(context)
    initialization_seconds = time.perf_counter() - initialization_started
    trainable, total = count_parameters(built.model)
    logger.info("%s: %s trainable parameters of %s.", method_args.method, f"{trainable:,}", f"{total:,}")
    if training_args.gradient_checkpointing and method_args.method != "full":
        built.model.enable_input_require_grads()
    record.update(
        status="training",
        trainable_parameters=trainable,
        total_parameters=total,
        method_details=built.details,
        calibration_wall_time_s=round(built.calibration_seconds, 3),
        initialization_wall_time_s=round(initialization_seconds, 3),
    )
    if inputs.calibration is not None:
        record["calibration"]["wall_time_s"] = round(built.calibration_seconds, 3)
    if is_main:
        write_run_record(Path(training_args.output_dir), record)
    return built


def train_and_save(
    task: TaskDefaults,
    built: BuiltMethod,
    method_args: MethodArguments,
    training_args: TrainingArguments,
    inputs: RunInputs,
    resume: Optional[str],
    record: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Train the built model, save its outputs (and the merged model with --merge) and finish the run record."""
    is_main = training_args.process_index == 0
    output_dir = Path(training_args.output_dir)
    trainer = build_trainer(task, built, training_args, inputs.data, inputs.collator, inputs.tokenizer)
    training_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    training_seconds = time.perf_counter() - training_started

    save_outputs(trainer, built, inputs.tokenizer, method_args.method, output_dir)
    record.update(
        status="finished",
        training_wall_time_s=round(training_seconds, 3),
        global_step=trainer.state.global_step,
        train_loss=result.training_loss,
        train_metrics=result.metrics,
        optimizer_learning_rates=sorted({group.get("initial_lr", group["lr"]) for group in trainer.optimizer.param_groups}),
    )
    if inputs.data.evaluation is not None:
        record["eval_metrics"] = trainer.evaluate()
    if method_args.merge:
        record["merged_model"] = str(save_merged(trainer, inputs.tokenizer, output_dir))
    record["outputs"] = sorted(p.name for p in output_dir.iterdir()) if is_main else []
    record["total_wall_time_s"] = round(time.perf_counter() - started, 3)
    if is_main:
        write_run_record(output_dir, record)
    logger.info(
        "Done: calibration %.1f s, training %.1f s; outputs in %s.", built.calibration_seconds, training_seconds, output_dir
    )
    return record


def initial_record(task, model_args, data_args, method_args, training_args, data, calibration, resume) -> dict[str, Any]:
    """The run record as it stands before the method is built (a resumed run keeps the earlier records)."""
    record: dict[str, Any] = {
        "task": task.name,
        "method": method_args.method,
        "status": "initializing",
        "base_model": model_args.base_model,
        "data": data.origin,
        "num_train_examples": len(data.train),
        "labels": data.labels,
        "arguments": arguments_record(model_args, data_args, method_args, training_args),
        "world_size": training_args.world_size,
        "device": str(training_args.device),
        "deepspeed": training_args.deepspeed,
        "resumed_from": resume,
        "library_versions": library_versions(),
    }
    if calibration is not None:
        record["calibration"] = calibration.record()
    previous = Path(training_args.output_dir) / RUN_RECORD_FILE
    if resume is not None and previous.is_file():
        earlier = json.loads(previous.read_text())
        history = earlier.pop("previous_runs", [])
        earlier.pop("arguments", None)
        record["previous_runs"] = history + [earlier]
    return record


def _task_type(task: TaskDefaults):
    from peft import TaskType

    return TaskType.SEQ_CLS if task.kind == SEQUENCE_CLASSIFICATION else TaskType.CAUSAL_LM


def main(task: TaskDefaults, argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Entry point of a task script: parse the command line and train."""
    return train(task, *parse_training_arguments(task, argv))
