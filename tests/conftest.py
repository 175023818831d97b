"""Shared test set-up: offline transformers, headless matplotlib, quick hypothesis profile, and the toy
tasks and models several test modules train (import them with ``from conftest import ...``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import settings  # noqa: E402
from torch import nn  # noqa: E402

from ggprior.tasks import TaskData  # noqa: E402
from ggprior.train import TrainConfig  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")

BAG_VOCAB = 32
TOY_VOCAB, TOY_DIM = 20, 8


def toy_task(n: int = 96, seed: int = 0, split: str = "train", vocab: int = BAG_VOCAB) -> TaskData:
    """A separable toy classification split: the label says which half of the vocabulary the tokens are from."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(1, vocab // 2, (n, 8), generator=g) + y[:, None] * (vocab // 2 - 1)
    lengths = torch.randint(3, 9, (n,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return TaskData("toy", split, "classification", {"input_ids": ids * mask, "attention_mask": mask, "labels": y},
                    num_labels=2)


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, warmup=0.1, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class BagClassifier(nn.Module):
    """Mean of token embeddings -> linear: enough to learn 'which half of the vocabulary'."""

    def __init__(self, num_labels=2, dim=16):
        super().__init__()
        self.emb = nn.Embedding(BAG_VOCAB, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, input_ids, attention_mask, labels):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        logits = self.head(self.drop(h))
        return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))


def bag_model(seed: int = 0) -> BagClassifier:
    torch.manual_seed(seed)
    return BagClassifier()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(TOY_DIM, TOY_DIM)

    def forward(self, h):
        return (torch.relu(self.fc(h)) + h,)


class Toy(nn.Module):
    """Embedding -> 2 residual blocks (a ModuleList) -> mean-pooled linear head; no dropout."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(TOY_VOCAB, TOY_DIM)
        self.layer = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(TOY_DIM, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.emb(input_ids)
        for block in self.layer:
            h = block(h)[0]
        m = attention_mask.unsqueeze(-1).float()
        logits = self.classifier((h * m).sum(1) / m.sum(1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def toy_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()
