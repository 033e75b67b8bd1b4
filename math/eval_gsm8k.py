"""Evaluate a model on GSM8K (greedy; the number after `The answer is: `), or score a predictions file.

    python math/eval_gsm8k.py --model RUN_DIR                     # --protocol paper: the authors' eval_gsm8k.py
    python math/eval_gsm8k.py --model RUN_DIR --protocol robust   # exact numbers, any marker case, last-number fallback
    python math/eval_gsm8k.py --predictions RUN_DIR/eval/gsm8k_predictions.jsonl --data_file test.jsonl

`--protocol paper` (default) reproduces the authors' stop strings and answer reading, so the number sits beside the
paper's table. Writes `<model dir>/eval/gsm8k.json` (or --output) and the generations beside it. `--help` lists
every option.
"""

from tlora.evaluation.answers import main_for_task
from tlora.evaluation.gsm8k import TASKS

if __name__ == "__main__":
    main_for_task(TASKS, description=__doc__)
