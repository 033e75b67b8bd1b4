#!/usr/bin/env python
"""Fine-tune a causal LM on WizardLM Evol-Instruct (the paper's chat set-up) with any of the compared methods.

Defaults are the paper's: Llama-2-7B, the first 100k rows of WizardLMTeam/WizardLM_evol_instruct_70k
(instruction -> output; that release has 70k rows), r = alpha = 128, 1 epoch, lr 2e-5, cosine, 3 % warm-up, batch 128
(micro-batch 8), cut-off 512, bf16. Every transformers.TrainingArguments flag works.
"""

from tlora.training import TaskDefaults, main
from tlora.training.arguments import paper_defaults

TASK = TaskDefaults(
    name="chat",
    description=__doc__,
    defaults=paper_defaults(
        data_path="WizardLMTeam/WizardLM_evol_instruct_70k",
        dataset_field=["instruction", "output"],
        max_samples=100_000,
        output_dir="outputs/chat-{method}",
    ),
)

if __name__ == "__main__":
    main(TASK)
