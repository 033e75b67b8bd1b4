"""Reading rows: one reader for every data file the project takes and for hub datasets, with one error class.

Local files: `.json` (a list of objects, or an object with exactly one field holding that list, such as
`{"rows": [...]}` or `{"data": [...]}`; a `.json` file that holds one object a line is read as JSON Lines), `.jsonl`,
either of them gzipped (`.json.gz`, `.jsonl.gz`), and `.parquet`. Anything else that is not a local path is a hub
dataset id, read with `datasets.load_dataset`. Every row is a JSON object; errors name the file, the row and, for
JSON Lines, the line.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".gz")


class DataFormatError(ValueError):
    """A data file or row that cannot be used; the message names the file, the row (and line) and the fix."""


class RowSource(list):
    """The rows of one data source (a list of dicts), with what is needed to point at a row in an error message.

    `line_numbers` are the 1-based lines of JSON Lines rows; `row_numbers` the positions of the rows in the whole
    source when they are a selection of it; `full_size` the number of rows in the whole source, before any
    `max_samples` cut, and `take(positions)` reads any of them.
    """

    def __init__(
        self,
        rows: Sequence[Any],
        origin: str,
        line_numbers: Optional[Sequence[int]] = None,
        row_numbers: Optional[Sequence[int]] = None,
        full_size: Optional[int] = None,
        take: Optional[Callable[[Sequence[int]], "RowSource"]] = None,
    ):
        super().__init__(rows)
        self.origin = origin
        self.line_numbers = list(line_numbers) if line_numbers is not None else None
        self.row_numbers = list(row_numbers) if row_numbers is not None else None
        self.full_size = len(self) if full_size is None else full_size
        self._take = take

    @property
    def rows(self) -> list[Any]:
        """The rows as a plain list."""
        return list(self)

    def row_number(self, index: int) -> int:
        """The position of row `index` in the whole source."""
        return self.row_numbers[index] if self.row_numbers is not None else index

    def where(self, index: int) -> str:
        """'file.jsonl, line 4 (row 3)' or 'file.json, row 3', for error messages."""
        row = self.row_number(index)
        if self.line_numbers is not None:
            return f"{self.origin}, line {self.line_numbers[index]} (row {row})"
        return f"{self.origin}, row {row}"

    def select(self, indices: Sequence[int]) -> "RowSource":
        """The rows at `indices` of this source (positions in it, not in the whole source)."""
        indices = [int(i) for i in indices]
        return RowSource(
            [self[i] for i in indices],
            self.origin,
            [self.line_numbers[i] for i in indices] if self.line_numbers is not None else None,
            [self.row_number(i) for i in indices],
            self.full_size,
            self.take,
        )

    def head(self, max_samples: Optional[int]) -> "RowSource":
        """The first `max_samples` rows (all rows for None); `take` still reaches the whole source."""
        if max_samples is None or max_samples >= len(self):
            return self
        return self.select(range(max_samples))

    def take(self, positions: Sequence[int]) -> "RowSource":
        """The rows at `positions` of the whole source (which may lie beyond a `max_samples` cut)."""
        bad = [p for p in positions if not 0 <= int(p) < self.full_size]
        if bad:
            raise IndexError(f"{self.origin} has {self.full_size} rows; no row {bad[0]}")
        if self._take is not None:
            return self._take(positions)
        return self.select(positions)


def is_local_path(data_path: str) -> bool:
    """True for an existing path, a path written as one ('./', '/', '~'), or a name with a local data suffix."""
    name = str(data_path)
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.lower().endswith(LOCAL_SUFFIXES)


def _open_text(path: str):
    """A text handle on `path`, decompressing `.gz` files."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _data_suffix(path: str) -> str:
    """The suffix that says the format: '.jsonl' for 'rows.jsonl.gz'."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return os.path.splitext(name)[1]


def _require_objects(source: RowSource) -> RowSource:
    """Raise at the first row that is not a JSON object."""
    for index, row in enumerate(source):
        if not isinstance(row, Mapping):
            raise DataFormatError(f"{source.where(index)}: expected a JSON object, got a {type(row).__name__}")
    return source


def _json_lines(path: str, text: str) -> RowSource:
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"{path}, line {number} (row {len(rows)}): not valid JSON ({error.msg} at column {error.colno}); fix "
                "or remove that line"
            ) from None
        lines.append(number)
    return RowSource(rows, path, lines)


def _json_document(path: str, text: str) -> RowSource:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a .json file holding JSON Lines
            return _json_lines(path, text)
        raise DataFormatError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); a .json file holds a "
            "list of objects (or one object whose single list field holds them), a .jsonl file one object a line"
        ) from None
    if isinstance(data, Mapping):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataFormatError(
                f"{path} holds a JSON object with {len(lists)} list fields {lists}; expected a list of rows, or an "
                'object with exactly one list field such as {"rows": [...]}'
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataFormatError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects, one per row")
    return RowSource(data, path)


def read_rows(path: str) -> RowSource:
    """The rows of a local .json / .jsonl (optionally .gz) or .parquet file."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist; pass an existing .json, .jsonl, .gz or .parquet file")
    suffix = _data_suffix(path)
    if suffix == ".parquet" and not path.lower().endswith(".gz"):
        import pyarrow.parquet as parquet

        return _require_objects(RowSource(parquet.read_table(path).to_pylist(), path))
    if suffix not in (".json", ".jsonl"):
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl (optionally .gz) or .parquet")
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path} cannot be read as UTF-8 text ({error}); is it the file you meant?") from None
    source = _json_lines(path, text) if suffix == ".jsonl" else _json_document(path, text)
    return _require_objects(source)


def _read_hub(name: str, config: Optional[str], split: str, max_samples: Optional[int]) -> RowSource:
    """The rows of a hub dataset split; rows past `max_samples` stay on disk until `take` asks for them."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"reading the hub dataset {name} needs `datasets` (pip install datasets), or pass a local file") from error
    logger.info("Loading %s (config %s, split %s) with datasets", name, config, split)
    dataset = datasets.load_dataset(name, config, split=split)
    origin = f"dataset {name}" + (f" ({config})" if config else "") + f" split {split}"

    def take(positions: Sequence[int]) -> RowSource:
        positions = [int(p) for p in positions]
        return RowSource(dataset.select(positions).to_list(), origin, None, positions, len(dataset), take)

    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    return RowSource(dataset.select(range(count)).to_list(), origin, None, None, len(dataset), take)


def load_rows(
    data_path: str,
    *,
    hub_config: Optional[str] = None,
    hub_split: str = "train",
    max_samples: Optional[int] = None,
) -> RowSource:
    """The rows of a local file (see `read_rows`) or of split `hub_split` of a hub dataset, cut to `max_samples`."""
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if is_local_path(data_path):
        source = read_rows(data_path).head(max_samples)
    else:
        source = _read_hub(data_path, hub_config, hub_split, max_samples)
    if not source:
        raise DataFormatError(f"{source.origin} has no rows")
    return source
