"""`featurize train` with its one worker run in the test's own process, for the tests of what the
epochs decide (the kept epoch, early stopping, a non-finite loss, the normalisation's statistics,
what the order demo's LSTM learns):
each Ray Train fit starts a controller and a worker process that imports torch (~12 CPU-s on the
2-core machine), the loop itself takes a fraction of a second on these tables.

Everything but Ray Train's transport is the real thing: the driver (loop.train: plan, lease,
datasets in the session's Ray object store, statistics, checkpoint, evaluation) and the workers' loop
(epochs.train_loop), whose reports are kept where Ray Train keeps them (OUT/_train/<run>/checkpoint_*).
The real Ray Train path is tested too: resume after a killed worker, two workers, a streamed
table, an object store, the CLI, the sweeps (test_train.py, test_train_edges.py, test_normalize.py,
test_sweep.py, test_lbfgs.py)."""
from __future__ import annotations

import contextlib
import os
import shutil
from types import SimpleNamespace

import pytest


class InProcessTrainer:
    """ray.train.torch.TorchTrainer's constructor and fit(), one worker (rank 0), here."""

    def __init__(self, train_loop_per_worker, train_loop_config, scaling_config, datasets, run_config):
        assert scaling_config.num_workers == 1 and run_config.storage_filesystem is None, "one local worker only"
        self.loop, self.config, self.datasets = train_loop_per_worker, train_loop_config, datasets or {}
        self.folder = os.path.join(run_config.storage_path, run_config.name)

    def fit(self):
        import ray.train
        import ray.train.torch
        import torch

        saved = []

        def report(metrics, checkpoint=None):
            if checkpoint is not None:  # its folder is the worker's temporary one: keep a copy, as Ray Train does
                saved.append(os.path.join(self.folder, f"checkpoint_{len(saved):06d}"))
                shutil.copytree(checkpoint.path, saved[-1])

        with pytest.MonkeyPatch.context() as m:
            m.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
            m.setattr(ray.train, "get_checkpoint", lambda: None)  # a fresh run: resuming is test_train_edges'
            m.setattr(ray.train, "get_dataset_shard", lambda name: self.datasets[name])
            m.setattr(ray.train, "report", report)
            m.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
            m.setattr(ray.train.torch, "prepare_model", lambda model: model)
            self.loop(self.config)
        return SimpleNamespace(error=None, checkpoint=ray.train.Checkpoint.from_directory(saved[-1]) if saved else None)


@contextlib.contextmanager
def in_process():
    """Within it, loop.train fits in this process (the session's Ray must be up: the datasets and
    the epoch lines' queue live there)."""
    import ray.train.torch

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ray.train.torch, "TorchTrainer", InProcessTrainer)
        yield
