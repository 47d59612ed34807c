"""Ray Data reads the run's todo from the driver's disk: a block per row group of the todo files
(planfile.read_task_files), so the todo is never a list of in-memory blocks on the driver."""
from __future__ import annotations

import os
from functools import partial
from typing import Iterator, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.util.client
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask


def read_todo(files: List[str]) -> ray.data.Dataset:
    """Read on the driver's node (the files are on its disk), claiming no CPU, so that a head
    without CPUs for tasks still reads them; a read task per row group (Ray's ParquetDatasource
    makes one per file), and no splitting of them (override_num_blocks).
    Through Ray Client (`ray://`) the driver is not on a node of the cluster, whose workers cannot
    read its disk: there the row groups travel as blocks, through the object store (the todo is
    then in the driver's memory while they are put, as before the plan streamed)."""
    if ray.util.client.ray.is_connected():
        return ray.data.from_blocks([group for f in files for group in _row_groups(pq.ParquetFile(f))])
    source = _TodoSource(files)
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    return ray.data.read_datasource(source, override_num_blocks=max(1, groups), num_cpus=0)


def _row_groups(source: pq.ParquetFile) -> Iterator[pa.Table]:
    """A file's row groups, the file opened once (not once a group)."""
    return (source.read_row_group(g) for g in range(source.metadata.num_row_groups))


def _read_group(path: str, group: int) -> Iterator[pa.Table]:
    yield pq.ParquetFile(path).read_row_group(group)


class _TodoSource(Datasource):
    def __init__(self, files: List[str]):
        self.files = files

    @property
    def supports_distributed_reads(self) -> bool:
        return False

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(os.path.getsize(f) for f in self.files)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None) -> List[ReadTask]:
        tasks = []
        for path in self.files:
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group)
                block = BlockMetadata(num_rows=stats.num_rows, size_bytes=int(stats.total_byte_size),
                                      input_files=None, exec_stats=None)
                tasks.append(ReadTask(partial(_read_group, path, group), block,
                                      per_task_row_limit=per_task_row_limit))
        return tasks
