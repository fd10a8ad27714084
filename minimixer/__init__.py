"""minimixer: MLP-Mixer from scratch in NumPy, with hand-written forward and backward passes.

    import minimixer as mm
    cfg = mm.get_config("mixer_b16_224")
    params = mm.load_weights("model.safetensors", cfg)        # timm's file, timm's names
    params, cfg = mm.load_checkpoint("Mixer-B_16.npz")        # any format; cfg from the file
    logits = mm.predict(params, images, cfg)                   # images (B, 3, 224, 224); fast path
    logits, cache = mm.mixer_forward(params, images, cfg)
    dx, grads = mm.mixer_backward(dlogits, cache)             # grads keyed like params
    feats, cache = mm.forward_features(params, images, cfg)   # (B, N, D); forward_head, forward_intermediates
"""
from .backend import BackendError, cupy_available, get_xp, to_backend, to_numpy
from .config import PRESETS, MixerConfig, get_config, param_count, param_shapes
from .layers import softmax_cross_entropy
from .fast import predict  # the fast inference path; model.predict is the clear one it equals
from .model import (backward_features, backward_head, backward_intermediates, forward_features, forward_head,
                    forward_intermediates, mixer_backward, mixer_forward)
from .params import init_params
from .checkpoints.convert import load_checkpoint, load_weights
from .checkpoints.safetensors_io import save_weights
from . import optim

__version__ = "0.1.0"

__all__ = [
    "BackendError", "MixerConfig", "PRESETS",
    "backward_features", "backward_head", "backward_intermediates",
    "forward_features", "forward_head", "forward_intermediates",
    "cupy_available", "get_config", "get_xp", "init_params", "load_checkpoint", "load_weights",
    "mixer_backward", "mixer_forward", "param_count", "param_shapes", "predict",
    "save_weights", "softmax_cross_entropy", "to_backend", "to_numpy",
]
