"""Counting what a model got right: shared by evaluation and the training loop."""
import numpy as np


def count_correct(logits, labels):
    """(top-1 hits, top-5 hits) of NumPy logits (B, K) against labels (B,)."""
    top5 = np.argsort(-logits, axis=1)[:, :5]  # (B, 5)
    return int((top5[:, 0] == labels).sum()), int((top5 == labels[:, None]).any(axis=1).sum())
