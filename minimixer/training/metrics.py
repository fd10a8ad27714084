"""Counting what a model got right: one evaluation for the training loop and `python -m minimixer.eval`."""
import numpy as np

from .. import fast
from ..backend import to_backend, to_numpy
from ..layers import softmax_cross_entropy


def count_correct(logits, labels):
    """(top-1 hits, top-5 hits) of NumPy logits (B, K) against labels (B,)."""
    top5 = np.argsort(-logits, axis=1)[:, :5]  # (B, 5)
    return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(axis=1).sum())


class Tally:
    """Running top-1/top-5 hits, loss and image count over batches."""

    def __init__(self):
        self.correct1 = self.correct5 = self.count = 0
        self.loss_sum = 0.0

    def add(self, logits, labels):
        self.loss_sum += softmax_cross_entropy(logits, labels)[0] * len(labels)
        hits1, hits5 = count_correct(logits, labels)
        self.correct1, self.correct5, self.count = self.correct1 + hits1, self.correct5 + hits5, self.count + len(labels)

    def result(self):
        """Top-1 / top-5 accuracy (%), mean loss and the count (NaN accuracies for no images)."""
        if self.count == 0:
            return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "count": 0}
        return {"top1": 100.0 * self.correct1 / self.count, "top5": 100.0 * self.correct5 / self.count,
                "loss": self.loss_sum / self.count, "count": self.count}


def evaluate(params, cfg, batches, backend="numpy", *, tally=None, on_batch=None):
    """Top-1 / top-5 accuracy (%) and mean loss over an iterable of (x, y) NumPy batches, through
    the fast path. tally: a Tally to count into (it keeps what was counted if a batch raises, e.g.
    on Ctrl-C); on_batch(tally) is called after each batch."""
    tally = Tally() if tally is None else tally
    for x, y in batches:
        tally.add(to_numpy(fast.predict(params, to_backend(x, backend), cfg)), y)
        if on_batch is not None:
            on_batch(tally)
    return tally.result()
