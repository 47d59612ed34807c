# %% [markdown]
# # featurize from Python: extract, read, train, apply
#
# A notebook-style script (`# %%` cells run one by one in VS Code, Jupyter's jupytext, or as
# `python docs/example.py`). It runs offline on a laptop: the images are generated and the
# backbone has random weights (`weights: none`); a real job names torchvision weights such as
# `IMAGENET1K_V1` or a state-dict file. Every call shares one embedded local Ray.

# %%
import numpy as np

import featurize
from pipeline.samples import make_image_folder

make_image_folder("example-data/images", n=40)   # <class>/<file>.jpg, a few broken files among them

job = {
    "name": "example-resnet18",
    "source": {"uri": "example-data/images", "format": "image_folder", "split": "all"},
    "preprocess": {"resize": 72, "crop": 64},
    "model": {"arch": "resnet18", "weights": "none", "layer": None, "pool": "avg"},
    "output": {"uri": "out/example"},
}
summary = featurize.run(job, {"output.dtype": "float32"})   # overrides as `--set` takes them
print(summary.features, "features,", sum(summary.errors.values()), "error rows")

# %% Run it again: every sample is committed already, so nothing is redone.
again = featurize.run(job, {"output.dtype": "float32"})
print("second run:", again.samples, "processed,", again.skipped, "already done")

# %% Read the table back: one float32 matrix, the ids and the exact labels.
out = featurize.open("out/example")
ids, labels, x = out.to_numpy()
print(x.shape, x.dtype)
print(out.errors().select(["sample_id", "stage", "error_type"]).to_pylist()[:3])

# Nearest neighbours by cosine similarity, in plain NumPy.
unit = x / np.linalg.norm(x, axis=1, keepdims=True)
nearest = np.argsort(-(unit @ unit[0]))[:4]
print("closest to", ids[0], "->", list(ids[nearest[1:]]))

# %% Train a linear probe on the table (Ray Train), then apply it: a new table of class probabilities.
training = {
    "name": "example-probe",
    "data": {"uri": "out/example", "column": "feature", "train_split": None, "val_fraction": 0.25},
    "head": {"kind": "linear"},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.01, "workers": 1},
    "output": {"uri": "out/example-probe"},
}
result = featurize.train(training)
featurize.apply("out/example-probe", "out/example", "out/example-probs")
print(featurize.open("out/example-probs").table().column_names)

# %% Or feed PyTorch directly: batches of float32 tensors, each row once per epoch.
dataset = featurize.FeatureDataset("out/example", "feature", split=None, batch_size=16)
batch = next(iter(dataset))
print(batch["x"].shape, batch["y"][:8], dataset.classes)
