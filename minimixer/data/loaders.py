"""Batches for training and evaluation: from in-memory arrays, or decoded from image files
by a thread pool. Both give images (B, C, H, W) float32 and labels (B,) int64."""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .folders import open_image


def epoch_order(n, seed, epoch, shuffle):
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ArrayLoader:
    """Batches from in-memory arrays x (n, C, H, W) and y (n,)."""

    def __init__(self, x, y, batch_size, *, shuffle=False, seed=0, drop_last=False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch=0, start=0):
        """Yield (x, y) for `epoch`, beginning at batch number `start`."""
        order = epoch_order(len(self.y), self.seed, epoch, self.shuffle)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def __iter__(self):
        return self.batches()


class ImageLoader:
    """Batches decoded and transformed by a thread pool (Pillow releases the GIL while it
    decodes and resizes), prefetching ahead so the model never waits on JPEG decoding.

    transform(img, rng) -> (C, H, W) float32; rng is a per-sample Generator for augmentation.
    Unreadable images are skipped (on_error(path, exc) is told) unless strict is set.
    """

    def __init__(self, samples, transform, batch_size, *, shuffle=False, seed=0, workers=4,
                 drop_last=False, strict=False, on_error=None, mode="RGB"):
        self.samples, self.transform, self.mode = samples, transform, mode
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.workers, self.drop_last, self.strict = max(1, workers), drop_last, strict
        self.on_error = on_error

    def __len__(self):
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _load(self, i, epoch):
        path, label = self.samples[i]
        try:
            rng = np.random.default_rng([self.seed, epoch, i])
            decode = getattr(self.transform, "decode", open_image)  # another library's decoder (OpenCV)
            return self.transform(decode(path, self.mode), rng), label
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported by file name
            if self.strict:
                raise ValueError(f"cannot read image {path}: {e}") from None
            if self.on_error:
                self.on_error(path, e)
            return None

    def batches(self, epoch=0, start=0):
        order = epoch_order(len(self.samples), self.seed, epoch, self.shuffle)
        chunks = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]
        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            ahead = 2  # batches in flight beyond the one being consumed
            for chunk in chunks[:ahead]:
                pending.append([pool.submit(self._load, i, epoch) for i in chunk])
            for b in range(len(chunks)):
                if b + ahead < len(chunks):
                    pending.append([pool.submit(self._load, i, epoch) for i in chunks[b + ahead]])
                items = [f.result() for f in pending.pop(0)]
                items = [it for it in items if it is not None]
                if items:
                    yield np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int64)

    def __iter__(self):
        return self.batches()
