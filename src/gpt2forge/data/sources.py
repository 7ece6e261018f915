"""Where documents come from: a Hugging Face hub dataset, local files, or a corpus embedded in Python itself.

Every source is read as Arrow tables in a fixed order, and every row has an index that counts *all* rows of the
source, including those a filter drops or that are empty. ``gpt2forge prepare`` records these indices in its
manifest, so a resumed run can start reading at a recorded row instead of re-tokenizing what came before.

- **Hub**: ``datasets.load_dataset(name, config, split=..., streaming=True)``: nothing is downloaded up front and
  memory stays bounded. Resuming re-reads (without tokenizing) the rows before the resume point.
- **Files**: parquet, JSON / JSON Lines and plain text (optionally ``.gz``/``.bz2``/``.xz``/``.zst``), given as
  paths, globs or directories, read through the same ``datasets`` streaming builders, one file at a time so
  that every error names its file and resuming skips whole parquet files by their row counts. A text file is
  one document by default (``txt_unit="paragraph"`` splits at blank lines, ``"line"`` at newlines).
- **Embedded**: CPython's ``pydoc_data.topics`` (the English reference pages behind ``help()``) and the source
  of the standard library's Python modules (code, docstrings, comments): about 6M GPT-2 tokens that need no
  download, for the quickstart and the tests. The documents are ordered by a hash of their names, so the
  validation shard (the first tokens) mixes prose and code like the rest.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
READ_ROWS = 256  # rows per Arrow table read: small enough that skipping and memory stay cheap
EMBEDDED_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


@dataclass
class DocBatch:
    """Consecutive documents that survived the filters, with the source row index of each."""

    rows: np.ndarray  # int64
    texts: list[str]


class Source:
    """A fixed sequence of Arrow tables; ``describe()`` is equal for two sources exactly when their rows are."""

    num_rows: int | None = None  # total rows, where known cheaply (for the ETA)
    label: str = "the source"  # in messages: the dataset's name, the files' paths

    def describe(self) -> dict:
        raise NotImplementedError

    def tables(self, start_row: int, columns: list[str]) -> Iterator[tuple[str, int, pa.Table]]:
        """``(origin, index of its first row, table)`` from the table holding ``start_row`` on.

        ``origin`` names the file or dataset for error messages. Tables may begin before ``start_row``, and
        may hold more than the ``columns`` asked for (sources that can skip reading the others do).
        """
        raise NotImplementedError


class HubSource(Source):
    """A hub dataset, streamed; opened only when read, so that describing it needs no network."""

    def __init__(self, name: str, config: str | None, split: str = "train", revision: str | None = None) -> None:
        self.name, self.config, self.split, self.revision = name, config, split, revision
        self.label = name + (f" (config {config})" if config else "")
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            import datasets

            try:
                self._dataset = datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=True, revision=self.revision
                )
            except Exception as e:  # hub, network and config errors come in many types; all need this message
                raise UserError(
                    f"cannot open dataset {self.label}, split {self.split!r} (--dataset/--dataset-config/--split): "
                    f"{type(e).__name__}: {e}"
                ) from None
        return self._dataset

    @property
    def num_rows(self) -> int | None:
        splits = self.dataset.info.splits
        return splits[self.split].num_examples if splits and self.split in splits else None

    def describe(self) -> dict:
        return {"kind": "hub", "dataset": self.name, "config": self.config, "split": self.split,
                "revision": self.revision}

    def tables(self, start_row: int, columns: list[str]) -> Iterator[tuple[str, int, pa.Table]]:
        row = 0
        try:
            for table in self.dataset.with_format("arrow").iter(batch_size=READ_ROWS):
                yield self.label, row, table
                row += table.num_rows
        except OSError as e:
            message = f"reading {self.label} failed at row {row:,}: {e}; run the same command again to resume"
            raise UserError(message) from e


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSIONS else path.suffixes[-1:]
    return FORMATS.get(suffixes[0].lower()) if suffixes else None


def resolve_files(patterns: list[str]) -> list[Path]:
    """The files that paths, globs and directories name: each pattern's matches sorted, duplicates dropped."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
            what = f"directory {pattern} has no .parquet, .jsonl, .json or .txt files"
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            what = f"--files {pattern} matches no files"
        else:
            found = [path] if path.is_file() else []
            what = f"file {pattern} does not exist"
        if not found:
            raise UserError(what)
        files.update(dict.fromkeys(p.resolve() for p in found))
    for path in files:
        if _format_of(path) is None:
            raise UserError(f"{path}: unknown format; use .parquet, .jsonl/.json or .txt (optionally compressed)")
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty (0 bytes)")
    return list(files)


class FileSource(Source):
    def __init__(self, patterns: list[str], txt_unit: str = "document") -> None:
        self.files = resolve_files(patterns)
        formats = sorted({_format_of(p) for p in self.files})
        if len(formats) > 1:
            raise UserError(f"--files mixes formats ({', '.join(formats)}): prepare each format into its own --out")
        self.format = formats[0]
        self.txt_unit = txt_unit
        self.schemas = [self._schema_of(p) for p in self.files]
        self.file_rows = [self._rows_of(p, schema) for p, schema in zip(self.files, self.schemas, strict=True)]
        self.num_rows = None if None in self.file_rows else sum(self.file_rows)
        shown = ", ".join(str(p) for p in self.files[:3])
        self.label = shown + (f" (and {len(self.files) - 3} more files)" if len(self.files) > 3 else "")

    def _schema_of(self, path: Path):
        """A parquet file's footer (schema and row count), which costs one small read; None for other formats."""
        if self.format != "parquet":
            return None
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is not a readable parquet file: {e}") from None

    def _rows_of(self, path: Path, metadata) -> int | None:
        """A file's row count where it costs nothing: parquet footers, and text files read whole."""
        if self.format == "text" and self.txt_unit == "document":
            return 1
        return metadata.num_rows if metadata is not None else None

    def describe(self) -> dict:
        files = [{"path": str(p), "bytes": p.stat().st_size} for p in self.files]
        description = {"kind": "files", "format": self.format, "files": files}
        if self.format == "text":
            description["txt_unit"] = self.txt_unit
        return description

    def tables(self, start_row: int, columns: list[str]) -> Iterator[tuple[str, int, pa.Table]]:
        import datasets

        row = 0
        for path, known_rows, metadata in zip(self.files, self.file_rows, self.schemas, strict=True):
            if known_rows is not None and row + known_rows <= start_row:
                row += known_rows  # wholly before the resume point: not even opened
                continue
            options = {"sample_by": self.txt_unit} if self.format == "text" else {}
            if metadata is not None and set(columns) <= set(metadata.schema.names):
                options["columns"] = columns  # parquet: decode only what is used (else all, to name them)
            try:
                dataset = datasets.load_dataset(
                    self.format, data_files=[str(path)], split="train", streaming=True, **options
                )
                for table in dataset.with_format("arrow").iter(batch_size=READ_ROWS):
                    yield str(path), row, table
                    row += table.num_rows
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 text ({e.reason})") from None
            except (pa.ArrowException, ValueError, OSError) as e:
                raise UserError(f"cannot read {path} as {self.format}: {type(e).__name__}: {e}") from None


@lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
    """pydoc's topic pages and the standard library's Python sources, ordered by a hash of their names."""
    from pydoc_data.topics import topics

    named = {f"topic:{name}": text for name, text in topics.items()}
    root = Path(sysconfig.get_paths()["stdlib"])
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EMBEDDED_SKIP_DIRS and not d.startswith("config-")]
        for name in names:
            if name.endswith(".py"):
                path = Path(directory, name)
                named[f"file:{path.relative_to(root).as_posix()}"] = path.read_text(encoding="utf-8", errors="replace")
    order = sorted(named, key=lambda key: hashlib.sha256(key.encode()).digest())
    return tuple(named[key] for key in order)


class EmbeddedSource(Source):
    def __init__(self) -> None:
        self.documents = embedded_documents()
        self.num_rows = len(self.documents)
        self.label = "the embedded corpus"

    def describe(self) -> dict:
        digest = hashlib.sha256()
        for text in self.documents:
            digest.update(hashlib.sha256(text.encode()).digest())
        return {
            "kind": "embedded",
            "python": platform.python_version(),
            "documents": len(self.documents),
            "sha256": digest.hexdigest(),
        }

    def tables(self, start_row: int, columns: list[str]) -> Iterator[tuple[str, int, pa.Table]]:
        for row in range(start_row, len(self.documents), READ_ROWS):
            yield "the embedded corpus", row, pa.table({"text": self.documents[row : row + READ_ROWS]})


def _columns(origin: str, table: pa.Table, column: str, option: str) -> pa.ChunkedArray:
    if column not in table.column_names:
        raise UserError(
            f"{origin} has no column {column!r} ({option}); its columns are: {', '.join(table.column_names)}"
        )
    return table.column(column)


def _checked_texts(origin: str, first_row: int, texts: pa.ChunkedArray) -> pa.ChunkedArray:
    """The text column, refused unless it is valid UTF-8 strings (JSON readers pass invalid bytes through)."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise UserError(f"{origin}: text column has type {texts.type}, not string; pick another with --text-column")
    try:
        texts.validate(full=True)
    except pa.ArrowInvalid:
        for i, value in enumerate(texts.cast(pa.large_binary()).to_pylist()):
            try:
                (value or b"").decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{origin} is not valid UTF-8 text (row {first_row + i:,}, byte {e.start:,})") from None
        raise
    return texts


def documents(
    source: Source,
    text_column: str = "text",
    *,
    start_row: int = 0,
    min_score: float | None = None,
    score_column: str = "int_score",
) -> Iterator[DocBatch]:
    """The non-empty documents of ``source`` from row ``start_row`` on, with ``score_column ≥ min_score``."""
    columns = [text_column] + ([score_column] if min_score is not None else [])
    for origin, first_row, table in source.tables(start_row, columns):
        if first_row + table.num_rows <= start_row:
            continue
        if first_row < start_row:
            table = table.slice(start_row - first_row)
            first_row = start_row
        texts = _checked_texts(origin, first_row, _columns(origin, table, text_column, "--text-column"))
        keep = pc.greater(pc.binary_length(texts), 0)
        if min_score is not None:
            scores = _columns(origin, table, score_column, "--score-column")
            if not (pa.types.is_integer(scores.type) or pa.types.is_floating(scores.type)):
                raise UserError(f"{origin}: --score-column {score_column!r} has type {scores.type}, not a number")
            keep = pc.and_(keep, pc.greater_equal(scores, min_score))
        keep = pc.fill_null(keep, False).to_numpy(zero_copy_only=False)
        rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)[keep]
        if rows.size:
            yield DocBatch(rows, texts.filter(pa.array(keep)).to_pylist())
