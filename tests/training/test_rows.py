"""One data layer: training and evaluation read rows through the same reader, with one error class."""

from __future__ import annotations

import gzip
import json

import pytest

ROWS = [{"query": "a", "response": "b"}, {"query": "c", "response": "d"}, {"query": "e", "response": "f"}]


def write_variants(directory) -> dict[str, str]:
    """The same three rows as {"rows": [...]} JSON, gzipped JSON Lines, gzipped JSON and parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "rows_object": directory / "wrapped.json",
        "jsonl_gz": directory / "rows.jsonl.gz",
        "json_gz": directory / "rows.json.gz",
        "parquet": directory / "rows.parquet",
    }
    paths["rows_object"].write_text(json.dumps({"rows": ROWS}))
    with gzip.open(paths["jsonl_gz"], "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in ROWS))
    with gzip.open(paths["json_gz"], "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize("variant", ["rows_object", "jsonl_gz", "json_gz", "parquet"])
def test_training_and_evaluation_read_every_format_alike(variant, tmp_path, byte_tokenizer):
    from tlora.evaluation.common import load_rows as evaluation_load_rows
    from tlora.training.arguments import DataArguments
    from tlora.training.core import build_task_data
    from training_helpers import load_task

    path = write_variants(tmp_path)[variant]
    assert list(evaluation_load_rows(path, hub_split="test")) == ROWS
    data = build_task_data(load_task("math_train.py"), DataArguments(data_path=path), byte_tokenizer, show_progress=False)
    assert list(data.source) == ROWS and len(data.train) == 3 and data.train.source_rows == [0, 1, 2]


def test_one_error_class_and_one_set_of_names():
    import tlora.evaluation.common as evaluation
    import tlora.data.rows as rows
    import tlora.training as training

    assert evaluation.DataFormatError is rows.DataFormatError is training.DataFormatError
    assert evaluation.load_rows is rows.load_rows and evaluation.is_local_path is rows.is_local_path
    assert issubclass(rows.DataFormatError, ValueError)


def test_errors_name_the_file_and_line_in_a_gzipped_file(tmp_path):
    from tlora.data.rows import DataFormatError, load_rows

    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n\n" + '{"query": "c", "response": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl\.gz, line 3 \(row 1\): not valid JSON"):
        load_rows(str(path))
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(DataFormatError, match=r"two\.json holds a JSON object with 2 list fields"):
        load_rows(str(two_lists))
    strings = tmp_path / "strings.jsonl"
    strings.write_text('{"query": "a"}\n"just text"\n')
    with pytest.raises(DataFormatError, match=r"strings\.jsonl, line 2 \(row 1\): expected a JSON object, got a str"):
        load_rows(str(strings))
    unknown = tmp_path / "rows.csv"
    unknown.write_text("query,response\n")
    with pytest.raises(DataFormatError, match=r"rows\.csv: unsupported file type '\.csv'"):
        load_rows(str(unknown))


def test_local_paths_and_hub_ids_are_told_apart(tmp_path):
    from tlora.data.rows import is_local_path

    assert is_local_path("rows.jsonl.gz") and is_local_path("./data") and is_local_path(str(tmp_path))
    assert is_local_path("~/data/test.parquet")
    assert not is_local_path("meta-math/MetaMathQA") and not is_local_path("openai/gsm8k")


def test_max_samples_cut_keeps_the_whole_source_reachable(tmp_path):
    from tlora.data.rows import load_rows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"query": str(i), "response": str(i)}) + "\n" for i in range(10)))
    head = load_rows(str(path), max_samples=4)
    assert [row["query"] for row in head] == ["0", "1", "2", "3"] and head.full_size == 10
    later = head.take([9, 5])
    assert [row["query"] for row in later] == ["9", "5"]
    assert later.where(0) == f"{path}, line 10 (row 9)"
