"""apply's map: OUT's rows read file by file, and the head over a batch (a Ray Data actor).

A batch the head fails on becomes error rows (stage "apply"), and so does a row whose outputs are
not finite (error_type NonFiniteFeature): never a NaN or inf feature in OUT2.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import faults
from ..output.tensors import sequences, vectors
from ..rows import ERROR_COLUMNS, error_fields, fail_nonfinite
from .checkpoint import Checkpoint
from .models import TEMPORAL

CARRIED = ("sample_id", "uri", "label", "split")  # the columns of every features table, copied as they are
STAGE = "apply"


def read_rows(files: pa.Table, fs, columns: List[str], todo=None) -> pa.Table:
    """The rows of OUT's files (one, as planned above), only `columns`; only the `todo` ids if given."""
    import ray

    tables = [pq.read_table(path, columns=columns, filesystem=fs) for path in files["path"].to_pylist()]
    rows = pa.concat_tables(tables)
    if todo is not None:
        ids = ray.get(todo) if isinstance(todo, ray.ObjectRef) else todo
        rows = rows.filter(pc.is_in(rows["sample_id"], value_set=ids))
    return rows


class HeadActor:
    """Ray Data actor: the head, loaded once; a batch of OUT's rows in, its output columns out."""

    def __init__(self, head: Checkpoint, column: str, name: str, frames: Optional[int], committer=None,
                 dtype: str = "float32"):
        import torch

        if committer is not None:  # Ray Data leaves a failed job's actors running: the driver stops them
            import ray

            committer.register.remote(ray.get_runtime_context().current_actor)

        torch.set_num_threads(1)
        self.head, self.column, self.name, self.frames = head, column, name, frames
        self.columns = head.columns(name, dtype)

    def __call__(self, batch: pa.Table) -> Dict[str, np.ndarray]:
        ids = batch["sample_id"].to_pylist()
        faults.point(STAGE, lambda: "\n".join(ids))
        out = {c: np.asarray(batch[c].to_pylist(), dtype=object) for c in CARRIED}
        try:
            out.update(self.outputs(batch[self.column]))
            fields = {c: "" for c in ERROR_COLUMNS}
        except Exception as e:  # the batch's samples become error rows; the job goes on
            out.update(self.blank(len(ids)))
            fields = error_fields(STAGE, e)
        out.update({c: np.full(len(ids), v, dtype=object) for c, v in fields.items()})
        self.refuse_non_finite(out)
        return out

    def refuse_non_finite(self, out: Dict[str, np.ndarray]) -> None:
        """A row whose values are not finite as stored (float16 overflows) is an error row, as in a run
        (rows.fail_nonfinite): NaN would poison every mean, index and search downstream."""
        for c, t in self.columns:
            if pa.types.is_fixed_size_list(t):
                dtype = np.float16 if t.value_type == pa.float16() else np.float32
                fail_nonfinite(out, {c: np.asarray(out[c], dtype=np.float32)}, dtype, STAGE)

    def outputs(self, column) -> Dict[str, np.ndarray]:
        if self.head.kind in TEMPORAL:
            x, lengths = sequences(column, self.frames)
            return self.head.outputs(x, lengths, self.name)
        return self.head.outputs(vectors(column), None, self.name)

    def blank(self, n: int) -> Dict[str, np.ndarray]:
        """Values of rows that become errors (the sink writes them to the errors table only)."""
        return {c: np.full(n, "", dtype=object) if pa.types.is_string(t) else np.zeros((n, t.list_size), np.float32)
                for c, t in self.columns}
