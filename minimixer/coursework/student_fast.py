"""The fast path, in the student edition: the clear path (model.py) running on your own layers.

The full minimixer has a reorganized, multi-core version of the same Mixer here. The student
edition leaves it out, because it contains the answers. `python -m minimixer.eval`, `predict`,
`train` and `bench` call these functions, so once your layers pass the self-check
(python -m minimixer.coursework check), they all run on your implementation.
"""
STUDENT_EDITION = True  # the notebooks read it to size their training runs for the clear path


def __getattr__(name):
    if name == "AdamW":  # the full minimixer fuses its update here; the student edition runs yours
        from ..optim import AdamW
        return AdamW
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def num_threads():
    return 1


def load_kernels(dtype=None):
    """Nothing to load: the full minimixer compiles its fused kernels here."""


def predict(params, x, cfg):
    """Logits for images x (B, C, H, W): model.predict on your layers."""
    from ..model import predict as clear_predict
    return clear_predict(params, x, cfg)


def forward(params, x, cfg, *, drop_path_rate=0.0, drop_rate=0.0, rng=None):
    """Training forward: model.mixer_forward on your layers."""
    from ..model import mixer_forward
    return mixer_forward(params, x, cfg, drop_path_rate=drop_path_rate, drop_rate=drop_rate, rng=rng)


def backward(dlogits, cache, *, need_dx=False):
    """Returns (dx or None, grads), as the full minimixer's fast.backward does."""
    from ..model import mixer_backward
    dx, grads = mixer_backward(dlogits, cache)
    return (dx if need_dx else None), grads


def split_batch(B):
    """One share: the student edition runs the whole batch in one thread."""
    return [(0, B)]


def run_shares(fn, spans):
    return [fn(*span) for span in spans]
