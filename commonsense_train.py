#!/usr/bin/env python
"""Fine-tune a causal LM on commonsense_170k (the paper's commonsense set-up) with any of the compared methods.

Defaults are the paper's: Llama-2-7B, zwhe99/commonsense_170k (instruction [+ input] -> output; rows with a non-empty
`input` get the Alpaca prompt with an '### Input:' section), r = alpha = 32, lr 1e-4, batch 32 (micro-batch 8),
1 epoch, cosine, 3 % warm-up, cut-off 512, bf16. Every transformers.TrainingArguments flag works.
"""

from tlora.training import TaskDefaults, main
from tlora.training.arguments import paper_defaults

TASK = TaskDefaults(
    name="commonsense",
    description=__doc__,
    defaults=paper_defaults(
        data_path="zwhe99/commonsense_170k",
        dataset_field=["instruction", "output"],
        input_field="input",
        lora_r=32,
        lora_alpha=32,
        learning_rate=1e-4,
        global_batch_size=32,
        output_dir="outputs/commonsense-{method}",
    ),
)

if __name__ == "__main__":
    main(TASK)
