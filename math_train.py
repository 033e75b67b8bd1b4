#!/usr/bin/env python
"""Fine-tune a causal LM on MetaMathQA (the paper's math set-up) with any of the compared methods.

Defaults are the paper's: Llama-2-7B, the first 100k rows of meta-math/MetaMathQA (query -> response), r = alpha = 128,
1 epoch, lr 2e-5, cosine schedule, 3 % warm-up, batch 128 (micro-batch 8), cut-off 512, bf16 on GPUs that support it.
Every transformers.TrainingArguments flag works (--deepspeed, --report_to, --resume_from_checkpoint, ...).

    deepspeed --include=localhost:0,1,2,3,4,5,6,7 math_train.py --deepspeed config/ds_config_zero2_no_offload.json --method tlora
"""

from tlora.training import TaskDefaults, main
from tlora.training.arguments import paper_defaults

TASK = TaskDefaults(
    name="math",
    description=__doc__,
    defaults=paper_defaults(
        data_path="meta-math/MetaMathQA",
        dataset_field=["query", "response"],
        max_samples=100_000,
        output_dir="outputs/math-{method}",
    ),
)

if __name__ == "__main__":
    main(TASK)
