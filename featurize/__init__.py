"""featurize: dataset-scale image and video feature extraction on Ray Data, and training from it.

The code lives in the `pipeline` package; this is its public Python API (pipeline/api.py):

    import featurize
    featurize.run(job, overrides=None)          # a job file, a mapping or a JobConfig -> the summary
    featurize.open(OUT).to_numpy()              # (sample_ids, labels, features)
    featurize.train(training_file)              # a head on Ray Train -> per-epoch metrics
    featurize.apply(checkpoint, OUT, OUT2)      # a trained head over a table -> a new table
    featurize.evaluate(checkpoint, OUT, "test")  # accuracy, per-class F1, confusion matrix (no Ray)
    featurize.FeatureDataset(OUT, "feature")    # batches for a PyTorch training loop
    featurize.ray_dataset(OUT, "feature")       # a Ray Dataset that iter_torch_batches takes
    featurize.index(OUT); featurize.search(OUT, image="q.jpg", k=5)   # similarity search (faiss, no Ray)
    featurize.dedup(OUT, 0.95); featurize.report(OUT)                  # near-duplicates; OUT/_report.html

Every refusal (a bad job file, an unknown model, an output holding another job's) raises
`featurize.Refused`; the CLI prints its message on one line and exits 2.
"""
from pipeline import __version__
from pipeline.api import Output, apply, dedup, evaluate, index, open, report, run, search, train  # noqa: A004
from pipeline.errors import Refused
from pipeline.train.loader import FeatureDataset, ray_dataset

__all__ = ["__version__", "Refused", "run", "open", "train", "apply", "Output", "FeatureDataset", "ray_dataset",
           "index", "search", "dedup", "report", "evaluate"]
