"""The one evaluation task interface: a new task is one class; the runner writes the one result schema."""

import json
import os
from dataclasses import dataclass

import pytest

from tlora.evaluation import sandbox_probe
from tlora.evaluation.generation import CallableBackend, GenerationSettings, generation_settings
from tlora.evaluation.task import RunOptions, Scores, TaskData, evaluate_task

COMMON_KEYS = {"task", "protocol", "data", "num_items", "model", "backend", "records"}


@dataclass
class ReverseTask:
    """A task written only against the interface: reverse each word; a record is correct when the model did."""

    words: tuple = ("abc", "tlora", "xy")
    name: str = "reverse"
    protocol: str = "exact"

    def load_data(self) -> TaskData:
        return TaskData(list(self.words), "words.txt", len(self.words))

    def generation_settings(self) -> GenerationSettings:
        return generation_settings(8, stop=[])

    def generate(self, data, backend, settings) -> list[dict]:
        texts = backend.generate([f"reverse {word}" for word in data.items], settings)
        return [{"id": index, "completion": text} for index, text in enumerate(texts)]

    def read_predictions(self, path, data) -> list[dict]:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    def score(self, data, predictions) -> Scores:
        records = [
            {
                "id": row["id"],
                "completion": row["completion"],
                "correct": row["completion"] == data.items[row["id"]][::-1],
            }
            for row in predictions
        ]
        correct = sum(record["correct"] for record in records)
        return Scores({"accuracy": correct / len(records)}, records, len(records))


def test_a_task_written_against_the_interface_gets_the_common_schema_and_a_rescorable_predictions_file(tmp_path):
    output = str(tmp_path / "eval" / "reverse.json")
    backend = CallableBackend(lambda prompt: prompt.split()[1][::-1] if "tlora" not in prompt else "wrong")
    result = evaluate_task(ReverseTask(), RunOptions(model="m", output=output), backend=backend)
    assert COMMON_KEYS <= set(result) and result["accuracy"] == pytest.approx(2 / 3)
    assert (result["task"], result["protocol"], result["model"], result["backend"]) == (
        "reverse",
        "exact",
        "m",
        "callable",
    )
    assert result["data"] == {"source": "words.txt", "num_items": 3, "expected_items": None, "subset": False}
    assert result["generation"]["max_new_tokens"] == 8 and list(result)[-1] == "records"
    assert json.loads(open(output, encoding="utf-8").read()) == result
    predictions = str(tmp_path / "eval" / "reverse_predictions.jsonl")
    rescored = evaluate_task(ReverseTask(), RunOptions(predictions=predictions))
    assert rescored["accuracy"] == result["accuracy"] and rescored["backend"] is None
    assert rescored["predictions_file"] == predictions and "generation" not in rescored


def test_without_predictions_or_a_model_the_runner_says_what_to_pass():
    with pytest.raises(ValueError, match=r"--model PATH.*--predictions FILE"):
        evaluate_task(ReverseTask(), RunOptions())


def test_the_isolation_probe_is_a_module_that_reports_uid_pid_and_descriptors(capsys):
    sandbox_probe.main(["-c"])
    uid, pid, descriptors = map(int, capsys.readouterr().out.split())
    assert (uid, pid) == (os.getuid(), os.getpid()) and descriptors >= 3
