"""The training core of the task scripts (math_train.py, commonsense_train.py, code_train.py, chat_train.py,
nlu_train.py): one data pipeline, prompt, method registry (`tlora.methods_table`) and Trainer glue for every method the paper compares."""

from ..data.rows import DataFormatError
from .arguments import (
    METHODS,
    DataArguments,
    MethodArguments,
    ModelArguments,
    TaskDefaults,
    TLoRATrainingArguments,
    build_parser,
)
from .core import main, parse_training_arguments, train
from .data import PaddingCollator, tokenize_instructions
from .registry import METHOD_BUILDERS
from .record import RUN_RECORD_FILE, read_run_record

__all__ = [
    "DataArguments",
    "DataFormatError",
    "METHODS",
    "METHOD_BUILDERS",
    "MethodArguments",
    "ModelArguments",
    "PaddingCollator",
    "RUN_RECORD_FILE",
    "TLoRATrainingArguments",
    "TaskDefaults",
    "build_parser",
    "main",
    "parse_training_arguments",
    "read_run_record",
    "tokenize_instructions",
    "train",
]
