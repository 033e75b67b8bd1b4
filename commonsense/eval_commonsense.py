"""Evaluate a model on the eight LLM-Adapters commonsense tasks (greedy; the first answer word), or score a
predictions file.

    python commonsense/eval_commonsense.py --model RUN_DIR --data_dir DATA/commonsense
    python commonsense/eval_commonsense.py --model RUN_DIR --data_dir DATA/commonsense --tasks boolq,piqa
    python commonsense/eval_commonsense.py --predictions RUN_DIR/eval/commonsense_predictions.jsonl --data_dir DATA

--data_dir holds <task>/test.json for boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge and
openbookqa. Writes `<model dir>/eval/commonsense.json` (or --output) with per-task accuracies and their mean.
"""

from tlora.evaluation.common import EvaluationArguments, GeneratorArguments, configure_logging, parse_arguments
from tlora.evaluation.commonsense import CommonsenseArguments, run


def main(argv=None) -> dict:
    """Parse the command line, evaluate, write the result and print a per-task summary."""
    model_arguments, evaluation_arguments, commonsense_arguments = parse_arguments(
        (GeneratorArguments, EvaluationArguments, CommonsenseArguments), __doc__, argv
    )
    configure_logging()
    result = run(model_arguments, evaluation_arguments, commonsense_arguments)
    for task, entry in result["tasks"].items():
        print(f"{task:>14}: {entry['accuracy']:.4f} ({entry['num_items']} items)")
    print(f"{'average':>14}: {result['accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
