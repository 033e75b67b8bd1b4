#!/usr/bin/env python
"""Fine-tune a causal LM on CodeFeedback (the paper's code set-up) with any of the compared methods.

Defaults are the paper's: Llama-2-7B, the first 100k rows of m-a-p/CodeFeedback-Filtered-Instruction
(query -> answer), r = alpha = 128, 1 epoch, lr 2e-5, cosine, 3 % warm-up, batch 128 (micro-batch 8), cut-off 512, bf16.
Every transformers.TrainingArguments flag works (--deepspeed, --report_to, --resume_from_checkpoint, ...).
"""

from tlora.training import TaskDefaults, main
from tlora.training.arguments import paper_defaults

TASK = TaskDefaults(
    name="code",
    description=__doc__,
    defaults=paper_defaults(
        data_path="m-a-p/CodeFeedback-Filtered-Instruction",
        dataset_field=["query", "answer"],
        max_samples=100_000,
        output_dir="outputs/code-{method}",
    ),
)

if __name__ == "__main__":
    main(TASK)
