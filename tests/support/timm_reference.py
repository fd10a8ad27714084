"""timm as the reference: build timm's MlpMixer for a MixerConfig with deterministic,
non-trivial weights, and run it forward and backward. Used by the fixture script and
the live tests; imports torch, so only import it where timm is available."""
import numpy as np
import torch

import timm
from minimixer.commands.bench import timm_model


def timm_mixer(cfg, *, seed=0, dtype=torch.float32):
    """timm's MlpMixer for cfg, with deterministic non-trivial weights (see perturb)."""
    torch.manual_seed(seed)
    return perturb(timm_model(cfg), seed).to(dtype).eval()


def timm_registered(name, *, seed=0):
    """timm.create_model(name) (no download), with deterministic non-trivial weights."""
    torch.manual_seed(seed)
    return perturb(timm.create_model(name, pretrained=False), seed).eval()


def perturb(model, seed):
    """Every tensor moved away from timm's init, deterministically.

    timm zero-initializes the head and all biases and sets LayerNorms to 1/0, so a
    fresh model would hide bugs in those paths.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    embed_dim = model.embed_dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:  # LayerNorm weights
                p.copy_(1.0 + 0.2 * noise)
            elif name == "head.weight":
                p.copy_(noise / np.sqrt(embed_dim))
            else:  # keep timm's init scale for the stem and block linears, plus a little noise
                p.add_(0.01 * noise)
    return model


def timm_forward_backward(model, x, dlogits):
    """logits, dx and every parameter's gradient (timm names) for loss = sum(logits * dlogits)."""
    model.zero_grad()
    xt = torch.from_numpy(x).requires_grad_(True)
    logits = model(xt)
    (logits * torch.from_numpy(dlogits)).sum().backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    return logits.detach().numpy(), xt.grad.numpy(), grads


def state_dict_numpy(model):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


TIMM_VERSION = timm.__version__
