"""Evaluate a model on MATH (greedy, all 5,000 test problems, at most 1,024 new tokens), or score a predictions file.

    python math/eval_math.py --model RUN_DIR                          # --protocol paper: the authors' eval_math.py
    python math/eval_math.py --model RUN_DIR --protocol robust        # math-verify on the answer
    python math/eval_math.py --model RUN_DIR --data_file MATH_test.jsonl
    python math/eval_math.py --predictions RUN_DIR/eval/math_predictions.jsonl --data_file test.jsonl

`--protocol paper` (default) reproduces the authors' prompt, stop strings and string comparison after
`The answer is: `, so the number sits beside the paper's table; `--protocol robust` reads answers with math-verify.
Writes `<model dir>/eval/math.json` (or --output) and the generations beside it. `--help` lists every option.
"""

from tlora.evaluation.answers import main_for_task
from tlora.evaluation.math_answers import TASKS

if __name__ == "__main__":
    main_for_task(TASKS, description=__doc__)
