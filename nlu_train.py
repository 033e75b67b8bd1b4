#!/usr/bin/env python
"""Fine-tune an encoder for GLUE-style sequence classification (the paper's NLU experiments) with any method.

Rows carry a text and a label (--dataset_field TEXT LABEL) or a sentence pair (--dataset_field TEXT PAIR LABEL);
labels are class ids or class names. The method page gives no NLU hyper-parameters; these defaults follow common
LoRA-on-GLUE practice and are a starting point, not the paper's: microsoft/deberta-v3-base, GLUE SST-2
(sentence -> label, accuracy on the validation split), r = 8, alpha = 16, lr 5e-4, batch 32, 3 epochs, cut-off 256.
"""

from tlora.training import TaskDefaults, main
from tlora.training.arguments import paper_defaults

TASK = TaskDefaults(
    name="nlu",
    kind="sequence_classification",
    description=__doc__,
    defaults=paper_defaults(
        base_model="microsoft/deberta-v3-base",
        data_path="nyu-mll/glue",
        dataset_config="sst2",
        dataset_field=["sentence", "label"],
        eval_split="validation",
        target_modules=["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-4,
        global_batch_size=32,
        per_device_train_batch_size=32,
        num_train_epochs=3,
        warmup_steps=0.06,
        cutoff_len=256,
        output_dir="outputs/nlu-{method}",
    ),
)

if __name__ == "__main__":
    main(TASK)
