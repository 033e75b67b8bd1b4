"""Evaluate a model on GSM8K (greedy; the number after `The answer is:`), or score a predictions file.

    python math/eval_gsm8k.py --model RUN_DIR [--data_file ../shared/data/gsm8k/test.jsonl] [--backend hf]
    python math/eval_gsm8k.py --predictions RUN_DIR/eval/gsm8k_predictions.jsonl --data_file test.jsonl

Writes `<model dir>/eval/gsm8k.json` (or --output) and the generations beside it. `--help` lists every option.
"""

from tlora.evaluation.common import main_for_task
from tlora.evaluation.gsm8k import TASK

if __name__ == "__main__":
    main_for_task(TASK, description=__doc__)
