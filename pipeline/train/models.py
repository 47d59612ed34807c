"""The trainable heads: what `featurize train` fits and `featurize apply` runs.

- `lstm`, `attention`: a temporal head (models/temporal.py, the same module an extraction job's
  `temporal:` entry runs) with a linear classifier on top, trained on the clip labels; the clip
  feature is the head's output.
- `linear` (a linear probe) and `mlp`: a classifier on a fixed-size column.
- `autoencoder`: unsupervised; the encoder's code is the compact feature.

Every head answers `forward(x, lengths)` (what the loss sees: logits, or a reconstruction) and
`embed(x, lengths)` (what apply writes: the clip feature, the code, or class probabilities).
Each normalises its input first (`head.normalize`, models/normalize.py): a temporal head inside
its temporal module (what head.safetensors holds), the others in `norm`; `normalizer(model)`
finds it, to set the training rows' statistics.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..models.normalize import Normalize
from ..models.temporal import AttentionHead, LstmHead

TEMPORAL, CLASSIFIERS, UNSUPERVISED = ("lstm", "attention"), ("linear", "mlp"), ("autoencoder",)
KINDS = TEMPORAL + CLASSIFIERS + UNSUPERVISED


class TemporalClassifier(nn.Module):
    def __init__(self, head: nn.Module, classes: int):
        super().__init__()
        self.head = head
        self.classifier = nn.Linear(head.out_dim, classes)
        self.out_dim = head.out_dim

    def embed(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(x, lengths)

    def probs(self, clip: torch.Tensor) -> torch.Tensor:
        """Class probabilities from clip features (embed's output): what apply writes beside them."""
        return torch.softmax(self.classifier(clip), dim=-1)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classifier(self.head(x, lengths))


class VectorClassifier(nn.Module):
    """`linear` (hidden None) or `mlp`: logits from one vector; embed gives class probabilities."""

    def __init__(self, input_dim: int, classes: int, hidden: Optional[int] = None, dropout: float = 0.0,
                 normalize: str = "none"):
        super().__init__()
        self.norm = Normalize(input_dim, normalize)
        if hidden is None:
            self.net = nn.Linear(input_dim, classes)
        else:
            self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, classes))
        self.out_dim = classes

    def embed(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.softmax(self(x), dim=-1)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(self.norm(x))


class AutoEncoder(nn.Module):
    """Reconstructs its normalised input: the loss compares forward(x) with target(x)."""

    def __init__(self, input_dim: int, code_dim: int, hidden: Optional[int] = None, normalize: str = "none"):
        super().__init__()
        self.norm = Normalize(input_dim, normalize)
        layers = [input_dim] + ([hidden] if hidden else []) + [code_dim]
        self.encoder = _stack(layers)
        self.decoder = _stack(layers[::-1])
        self.out_dim = code_dim

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def embed(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder(self.norm(x))

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.decoder(self.embed(x))


def _stack(sizes) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last: codes and reconstructions are signed)."""
    mods = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*mods)


def build(kind: str, input_dim: int, classes: int, head: Dict[str, Any], seed: int = 0) -> nn.Module:
    """The head for `kind` from the training file's `head:` values (HeadConfig), seeded; a `head`
    without `normalize` (a checkpoint written before it existed) normalises nothing."""
    norm = normalize_mode(head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "lstm":
            return TemporalClassifier(LstmHead(input_dim, head["hidden"] or input_dim, head["layers"],
                                               head["bidirectional"], norm), classes)
        if kind == "attention":
            return TemporalClassifier(AttentionHead(input_dim, head["hidden"] or input_dim, norm), classes)
        if kind == "linear":
            return VectorClassifier(input_dim, classes, normalize=norm)
        if kind == "mlp":
            return VectorClassifier(input_dim, classes, head["hidden"] or input_dim, head["dropout"], norm)
        if kind == "autoencoder":
            return AutoEncoder(input_dim, head["code_dim"], head["hidden"], norm)
    raise ValueError(f"head.kind: {kind!r} is not one of {', '.join(KINDS)}")


def temporal_config(kind: str, input_dim: int, head: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON config models/temporal.py reads beside a temporal head's weights."""
    config = {"kind": kind, "input_size": input_dim, "hidden_size": head["hidden"] or input_dim,
              "normalize": normalize_mode(head)}
    if kind == "lstm":
        config.update(num_layers=head["layers"], bidirectional=head["bidirectional"])
    return config


def supervised(kind: str) -> bool:
    return kind not in UNSUPERVISED


def normalize_mode(head: Dict[str, Any]) -> str:
    return head.get("normalize") or "none"


def normalizer(model: nn.Module) -> Normalize:
    """The head's input normalisation (inside the temporal module for lstm and attention)."""
    model = getattr(model, "module", model)  # under DDP
    return model.head.norm if isinstance(model, TemporalClassifier) else model.norm
