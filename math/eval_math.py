"""Evaluate a model on MATH (greedy; the answer after `The answer is:` checked with math-verify), or score a
predictions file.

    python math/eval_math.py --model RUN_DIR --data_file ../shared/data/math/test.jsonl   # all 5,000 problems
    python math/eval_math.py --model RUN_DIR                                             # MATH-500 from the hub
    python math/eval_math.py --predictions RUN_DIR/eval/math_predictions.jsonl --data_file test.jsonl

Writes `<model dir>/eval/math.json` (or --output) and the generations beside it. `--help` lists every option.
"""

from tlora.evaluation.common import main_for_task
from tlora.evaluation.math_answers import TASK

if __name__ == "__main__":
    main_for_task(TASK, description=__doc__)
