"""Batch inference: a registered model over a Parquet file with Ray Data, one output row per input
row.

Ray Data reads the file in blocks and runs ``map_batches`` over a pool of actors (each loads the
model once, through the same runtime as serving, so every variant format works). Blocks come back
in input order; the driver writes them to one Parquet file as they arrive (first to a temporary
file, renamed at the end: a failed run leaves no half-written output).

Output columns: every input column except the image column, then ``prediction`` (original label),
``probability`` (of that label) and ``probabilities`` (one per class, in the order of ``labels``,
which are stored in the file's metadata).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.errors import DataError, ResourceError, first_line, telling_line

PREDICTION, PROBABILITY, PROBABILITIES = "prediction", "probability", "probabilities"


@dataclass
class BatchPredictResult:
    model: str
    rows: int
    output: str
    seconds: float
    actors: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_column_of(schema: pa.Schema, given: str | None) -> str:
    """The column holding encoded images: ``given``, else the only binary (or {bytes, path})
    column."""
    if given:
        if given not in schema.names:
            raise DataError(
                f"--image-column: column '{given}' not found (columns: {', '.join(schema.names)})"
            )
        return given
    candidates = [
        f.name
        for f in schema
        if pa.types.is_binary(f.type)
        or pa.types.is_large_binary(f.type)
        or (
            pa.types.is_struct(f.type)
            and any(f.type.field(i).name == "bytes" for i in range(f.type.num_fields))
        )
    ]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise DataError(
            f"cannot tell which column holds the images (candidates: {found}); pass --image-column"
        )
    return candidates[0]


def read_artifact(directory: Path) -> dict[str, bytes]:
    """Every file of an artifact folder, by relative path (what the actors rebuild the folder
    from)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class PredictBatches:
    """Ray Data actor: loads the model once, turns each Arrow batch into its prediction columns.

    The driver ships the artifact's files through the object store, so the actors need no access to
    the MLflow store (nor its import time) and load exactly what the driver resolved.
    """

    def __init__(self, artifact: dict[str, bytes], image_column: str | None):
        import tempfile

        from kiln.models.predictor import load_predictor

        self._dir = tempfile.TemporaryDirectory(prefix="kiln-predict-")
        for name, data in artifact.items():
            path = Path(self._dir.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.predictor = load_predictor(self._dir.name)
        self.image_column = image_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kiln.data.decode import image_column, tabular_matrix

        spec = self.predictor.spec
        inputs: list[bytes | None] | np.ndarray
        if spec.preprocessing.kind == "image":
            column = self.image_column or ""  # always set for an image model (predict_parquet)
            inputs = image_column(batch, column)
            missing = [i for i, b in enumerate(inputs) if b is None]
            if missing:
                raise DataError(f"{len(missing)} rows have no image bytes in column '{column}'")
            keep = [c for c in batch.column_names if c != column]
        else:
            inputs = tabular_matrix(batch, spec.preprocessing.feature_names)
            keep = batch.column_names
        probs = self.predictor.predict_proba(inputs)
        best = probs.argmax(axis=1)
        out = batch.select(keep)
        out = out.append_column(PREDICTION, pa.array([spec.labels[i] for i in best]))
        out = out.append_column(PROBABILITY, pa.array(probs[range(len(best)), best], pa.float32()))
        return out.append_column(PROBABILITIES, pa.array(list(probs), pa.list_(pa.float32())))


def predict_parquet(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    tracking_uri: str | None = None,
    batch_size: int = 256,
    actors: int = 2,
    cpus_per_actor: float = 0.5,
    image_column: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    address: str | None = None,
    debug: bool = False,
) -> BatchPredictResult:
    """Predict every row of ``input_path`` into ``output_path``. Raises DataError, ModelError,
    ResourceError."""
    from kiln import tracking as trk
    from kiln.models.artifact import load_spec
    from kiln.ray_connection import check_placement, ensure_ray

    started = time.perf_counter()
    source, output = Path(input_path).expanduser(), Path(output_path).expanduser()
    if not source.exists():
        raise DataError(f"input file not found: {source}")
    try:
        schema = pq.read_schema(source) if source.is_file() else pq.ParquetDataset(source).schema
        total = pq.ParquetFile(source).metadata.num_rows if source.is_file() else None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{source} is not readable as Parquet ({first_line(exc)})") from None
    tracking_uri = tracking_uri or trk.resolve_tracking_uri(None, "runs")
    model_dir = trk.resolve_model_dir(model_uri, tracking_uri)  # fails fast on a wrong URI
    spec = load_spec(model_dir)
    column = None
    if spec.preprocessing.kind == "image":
        column = image_column_of(schema, image_column)
    else:
        missing = [n for n in spec.preprocessing.feature_names if n not in schema.names]
        if missing:
            raise DataError(f"{source} lacks the model's feature columns: {', '.join(missing)}")
    if output.resolve() == source.resolve():
        raise DataError("the output file must not be the input file")

    ensure_ray(address, debug=debug)
    import ray

    check_placement(actors, {"CPU": cpus_per_actor}, what="--actors")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output row i is input row i
    # Blocks of batch_size rows (streaming): the actors share the work and results arrive as they
    # finish.
    ds = ray.data.read_parquet(str(source)).repartition(target_num_rows_per_block=batch_size)
    predicted = ds.map_batches(
        PredictBatches,
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=cpus_per_actor,
        fn_constructor_args=(read_artifact(model_dir), column),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    rows, writer = 0, None
    try:
        for batch in predicted.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)  # batch_format="pyarrow"
            if writer is None:
                metadata = {
                    b"kiln.model": model_uri.encode(),
                    b"kiln.labels": json.dumps(spec.labels).encode(),
                }
                writer = pq.ParquetWriter(partial, batch.schema.with_metadata(metadata))
            writer.write_table(batch.replace_schema_metadata(writer.schema.metadata))
            rows += batch.num_rows
            if progress:
                progress(rows, total or 0)
        if writer is None:
            raise DataError(f"{source} holds no rows")
        writer.close()
        if total is not None and rows != total:
            raise ResourceError(f"batch inference produced {rows} rows for {total} input rows")
    except BaseException as exc:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        if isinstance(exc, ray.exceptions.RayError):
            raise DataError(f"batch inference failed: {telling_line(str(exc))}") from None
        raise
    partial.replace(output)
    return BatchPredictResult(
        model=model_uri,
        rows=rows,
        output=str(output),
        seconds=round(time.perf_counter() - started, 2),
        actors=actors,
    )
