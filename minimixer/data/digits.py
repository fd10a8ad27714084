"""The bundled 8x8 handwritten digits: loading, normalizing, the fixed train/test split."""
import gzip
from importlib import resources

import numpy as np

DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


def load_digits():
    """The 1,797 8×8 handwritten digits (scikit-learn's copy of the UCI set; see assets/README.md).

    Returns images (1797, 1, 8, 8) uint8 in 0..16 and labels (1797,) int64.
    """
    with resources.files("minimixer").joinpath("assets/digits.csv.gz").open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 1, 8, 8).astype(np.uint8), table[:, 64]


def normalize_digits(images):
    """uint8 0..16 -> float32 with mean/std 0.5, as the Google Mixer checkpoints normalize RGB."""
    return ((images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)


def digits_split():
    """The fixed, stratified split: within each class, every fifth image (the 5th, 10th, ...)
    is a test image: 355 test, 1,442 train.

    Returns (x_train, y_train, x_test, y_test), images normalized to float32.
    """
    images, labels = load_digits()
    test = np.zeros(len(labels), bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[4::5]] = True
    x = normalize_digits(images)
    return x[~test], labels[~test], x[test], labels[test]
