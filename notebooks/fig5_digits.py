"""The paper's Figure 5 on the bundled digits: train the two models notebook 5 draws, and measure them.

    python notebooks/fig5_digits.py            # writes notebooks/assets/fig5_digits{,_permuted}.safetensors

A Mixer with patch size 1 on the 8×8 digits, so every pixel is a token and the token-mixing
weights live on an 8×8 grid (the paper's B/16 has a 14×14 grid; the bundled `mixer_digits` model
has only 4×4). Training uses translation augmentation (random shifts of up to 2 pixels, the
background filling in), which the paper (§3.5) names as what shapes the units. The second model
is the paper's control: the same training on images whose 64 pixels are shuffled by one fixed
permutation.

Both runs are deterministic functions of SEED (batch order, shifts, initialization): rerunning on
the same machine reproduces the files bit for bit (another BLAS may round differently). Each takes
about two minutes on a 2-core machine (100 epochs of 1,442 images; 105 s and 231 s measured while
other jobs shared the cores). The outputs are about 105 KB each.
Notebook 5 and tests/test_notebook_claims.py load them and use the measures below.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import minimixer as mm  # noqa: E402
from minimixer.checkpoints.safetensors_io import atomic_write_bytes  # noqa: E402
from minimixer.data import ArrayLoader, digits_split  # noqa: E402
from minimixer.optim import lr_at  # noqa: E402
from minimixer.training.loop import make_optimizer, train_step  # noqa: E402
from minimixer.training.metrics import evaluate  # noqa: E402
from minimixer.training.settings import TrainSettings  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PATHS = {"natural": os.path.join(ASSETS, "fig5_digits.safetensors"),
         "permuted": os.path.join(ASSETS, "fig5_digits_permuted.safetensors")}
CFG = mm.MixerConfig(num_classes=10, img_size=8, in_chans=1, patch_size=1, num_blocks=2, embed_dim=32,
                     mlp_ratio=(1.0, 4.0))  # N = 64 tokens (one per pixel), D = 32, DS = 32, DC = 128
SEED = 0
SETTINGS = TrainSettings(epochs=100, batch_size=64, lr=1e-2, min_lr=1e-5, weight_decay=0.2, warmup=5.0,
                         clip_grad=1.0, seed=SEED)
MAX_SHIFT = 2  # pixels, in each direction
BACKGROUND = -1.0  # a blank pixel after normalization ((0/16 - 0.5)/0.5)


def pixel_permutation(seed=SEED):
    """The control's fixed shuffle of the 64 pixels: permuted[..., j] = image[..., perm[j]]."""
    return np.random.default_rng([seed, 5]).permutation(CFG.num_patches)


def permute_pixels(images, perm):
    B = len(images)
    return images.reshape(B, 1, -1)[:, :, perm].reshape(images.shape)


def random_shift(images, rng, max_shift=MAX_SHIFT):
    """Shift each image by (dy, dx), each uniform in [-max_shift, max_shift]; the background fills in."""
    B, _, H, W = images.shape
    out = np.full_like(images, BACKGROUND)
    dys, dxs = rng.integers(-max_shift, max_shift + 1, (2, B))
    for i, (dy, dx) in enumerate(zip(dys, dxs)):
        out[i, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            images[i, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def train(permuted, settings=SETTINGS, log=print):
    """Train one model; returns (params, test accuracy %). Augment first, then permute (the shuffle
    is a fixed property of the data set, the shift a property of the sample)."""
    x_train, y_train, x_test, y_test = digits_split()
    perm = pixel_permutation() if permuted else np.arange(CFG.num_patches)
    params = mm.init_params(CFG, seed=SEED)
    opt = make_optimizer(params, settings)
    rng = np.random.default_rng([settings.seed, 1])
    steps_per_epoch = -(-len(y_train) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    step = 0
    for epoch in range(settings.epochs):
        order = rng.permutation(len(y_train))
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            x = permute_pixels(random_shift(x_train[idx], rng), perm)
            lr = lr_at(step, base_lr=settings.lr, total_steps=total, warmup_steps=int(settings.warmup * steps_per_epoch),
                       min_lr=settings.min_lr)
            train_step(params, opt, x, y_train[idx], CFG, lr=lr, clip_grad=settings.clip_grad)
            step += 1
        if (epoch + 1) % 20 == 0:
            log(f"  epoch {epoch + 1}: lr {lr:.1e}")
    acc = evaluate(params, CFG, ArrayLoader(permute_pixels(x_test, perm), y_test, 256))["top1"]
    return params, acc


def save(params, path, **meta):
    import safetensors.numpy
    metadata = {"config": json.dumps(dataclasses.asdict(CFG)), **{k: json.dumps(v) for k, v in meta.items()}}
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, safetensors.numpy.save(arrays, metadata=metadata))


def load(kind="natural"):
    """(params, metadata) of a shipped model; metadata holds the test accuracy and, for the control,
    the permutation."""
    from safetensors import safe_open
    with safe_open(PATHS[kind], "numpy") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return mm.load_weights(PATHS[kind], CFG), meta


# --- measures -------------------------------------------------------------------------------

def init_weights(block=0):
    """The first token-mixing layer of block `block` at initialization (both models start here)."""
    return mm.init_params(CFG, seed=SEED)[f"blocks.{block}.mlp_tokens.fc1.weight"]


def correlation(a, b):
    """Pearson correlation of two weight matrices, taken as flat vectors."""
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def neighbour_correlation(W, grid=(8, 8)):
    """How smooth the units are: the correlation between the weights of horizontally or vertically
    adjacent grid positions, pooled over all units. About 0 for i.i.d. initial weights."""
    m = np.asarray(W).reshape(len(W), *grid)
    a = np.concatenate([m[:, :, :-1].ravel(), m[:, :-1, :].ravel()])
    b = np.concatenate([m[:, :, 1:].ravel(), m[:, 1:, :].ravel()])
    return correlation(a, b)


def spectral_centroid(W, grid=(8, 8)):
    """Per unit: the mean spatial frequency (cycles per grid side) of its 2D spectrum, weighted by
    magnitude, with the mean (DC term) left out. Low = smooth, high = checkerboard-like."""
    m = np.asarray(W).reshape(len(W), *grid)
    mag = np.abs(np.fft.fft2(m - m.mean(axis=(1, 2), keepdims=True)))  # (U, h, w)
    fy, fx = np.meshgrid(np.fft.fftfreq(grid[0]) * grid[0], np.fft.fftfreq(grid[1]) * grid[1], indexing="ij")
    radius = np.hypot(fy, fx)
    return (mag * radius).sum(axis=(1, 2)) / mag.sum(axis=(1, 2))


def paired_order(W, grid=(8, 8)):
    """The paper's presentation: units sorted by spectral centroid, each followed by its most
    anti-correlated partner among the units not yet placed. Returns [(unit, partner, corr)]."""
    W = np.asarray(W)
    corr = np.corrcoef(W)
    left = list(np.argsort(spectral_centroid(W, grid), kind="stable"))
    pairs = []
    while len(left) > 1:
        u = left.pop(0)
        partner = min(left, key=lambda v: corr[u, v])
        left.remove(partner)
        pairs.append((int(u), int(partner), float(corr[u, partner])))
    return pairs


def main():
    for kind in ("natural", "permuted"):
        t0 = time.perf_counter()
        print(f"training the {kind} model ({SETTINGS.epochs} epochs)...")
        params, acc = train(kind == "permuted")
        meta = {"test_top1": round(acc, 2), "seed": SEED, "max_shift": MAX_SHIFT,
                "settings": dataclasses.asdict(SETTINGS), "trained_by": "notebooks/fig5_digits.py"}
        if kind == "permuted":
            meta["permutation"] = pixel_permutation().tolist()
        save(params, PATHS[kind], **meta)
        W = params["blocks.0.mlp_tokens.fc1.weight"]
        if kind == "permuted":  # back to image order: column j acted on pixel perm[j]
            W = W[:, np.argsort(pixel_permutation())]
        print(f"{kind}: test top-1 {acc:.2f}% in {time.perf_counter() - t0:.0f} s; block 0 token fc1: "
              f"correlation with init {correlation(params['blocks.0.mlp_tokens.fc1.weight'], init_weights()):.3f}, "
              f"neighbour correlation {neighbour_correlation(W):.3f} (init {neighbour_correlation(init_weights()):.3f}) "
              f"-> {PATHS[kind]}")


if __name__ == "__main__":
    main()
