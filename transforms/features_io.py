"""Feature and failure Parquet files: schemas, writers, and readers.

Rows are batched into Arrow record batches before they reach the sink, so a
2048-d vector is one memcpy rather than 2048 Python floats.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.records import FeatureRow

FEATURE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

FAILURE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
        ("unit", pa.string()),
    ]
)


def feature_schema(dim: int, feature_dtype: str = "float32") -> pa.Schema:
    """The ARCHITECTURE.md feature row; ``feature`` is ``fixed_size_list<float>[dim]``."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("sha256", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            pa.field("label", pa.string(), nullable=True),
            ("feature", pa.list_(FEATURE_DTYPES[feature_dtype], dim)),
            ("unit", pa.string()),  # the listed input (file or shard file) the row came from
        ]
    )


def rows_to_table(rows: Sequence[FeatureRow], schema: pa.Schema) -> pa.Table:
    dim = schema.field("feature").type.list_size
    value_type = schema.field("feature").type.value_type
    np_dtype = np.float16 if value_type == pa.float16() else np.float32
    flat = np.concatenate([np.asarray(r.feature, dtype=np_dtype).reshape(-1) for r in rows])
    if flat.size != dim * len(rows):
        raise ValueError(f"feature dimension is not {dim}")
    metas = [r.meta for r in rows]
    return pa.Table.from_arrays(
        [
            pa.array([m.image_id for m in metas], pa.string()),
            pa.array([m.uri for m in metas], pa.string()),
            pa.array([m.sha256 for m in metas], pa.string()),
            pa.array([m.width for m in metas], pa.int32()),
            pa.array([m.height for m in metas], pa.int32()),
            pa.array([m.label for m in metas], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), dim),
            pa.array([m.unit for m in metas], pa.string()),
        ],
        schema=schema,
    )


class WriteFeatureParquet(beam.PTransform):
    """Batches ``FeatureRow`` into Arrow tables and writes ``prefix-SSSSS-of-NNNNN.parquet``."""

    def __init__(self, prefix: str, schema: pa.Schema, rows_per_group: int = 1024, num_shards: int = 0):
        super().__init__()
        self._prefix = prefix
        self._schema = schema
        self._rows = rows_per_group
        self._shards = num_shards

    def expand(self, rows):
        schema = self._schema
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._rows)
            | "ToArrow" >> beam.Map(rows_to_table, schema)
            | "Write" >> beam.io.WriteToParquetBatched(
                self._prefix, schema=schema, file_name_suffix=".parquet", num_shards=self._shards,
                codec="snappy",
            )
        )


class WriteFailureParquet(beam.PTransform):
    def __init__(self, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix = prefix
        self._shards = num_shards

    def expand(self, failures):
        return failures | "Write" >> beam.io.WriteToParquet(
            self._prefix, FAILURE_SCHEMA, file_name_suffix=".parquet", num_shards=self._shards, codec="snappy"
        )


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """Reads one Parquet file through Beam filesystems (local, gs://, s3://)."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pq.read_table(pa.BufferReader(f.read()), columns=columns)


def feature_matrix(table: pa.Table) -> np.ndarray:
    """The ``feature`` column as a float32 (n, D) array without a Python loop."""
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


def iter_tables(paths: Iterable[str], columns: list[str] | None = None) -> Iterator[pa.Table]:
    for path in paths:
        yield read_table(path, columns)


def failure_reasons(failure_parts: Iterable[str]) -> dict[str, int]:
    """``{"stage:ErrorClass": rows}`` over failure Parquet files, most frequent first and ties by name, so
    the same failures give the same manifest whatever order the runner wrote its parts in."""
    reasons: Counter[str] = Counter()
    for src in failure_parts:
        table = read_table(src, ["stage", "error"])
        for stage, error in zip(table.column("stage").to_pylist(), table.column("error").to_pylist(), strict=True):
            reasons[f"{stage}:{error}"] += 1
    return dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
