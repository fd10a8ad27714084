"""Training step for step against PyTorch (llm.c style), in float64 on a tiny Mixer.

timm's MlpMixer with torch.optim.AdamW / SGD(nesterov) and minimixer with its own
optimizers start from the same weights and take 10 steps on the same batches:
warmup then cosine, global-norm clipping, weight decay with exemptions. The losses
and the final params must agree to 1e-9 relative.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.timm

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import torch.nn.functional as F  # noqa: E402

import minimixer as mm  # noqa: E402
from support.helpers import assert_all_close, rel_error  # noqa: E402
from minimixer import optim  # noqa: E402
from minimixer.layers import softmax_cross_entropy  # noqa: E402
from support.timm_reference import state_dict_numpy, timm_mixer  # noqa: E402

CFG = dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)
STEPS, BASE_LR, WARMUP, CLIP = 10, 0.05, 3, 0.5


def batches(cfg):
    rng = np.random.default_rng(11)
    return [(rng.standard_normal((4, cfg.in_chans, *cfg.image_hw)), rng.integers(0, cfg.num_classes, 4))
            for _ in range(STEPS)]


def torch_optimizer(kind, model):
    decay = [p for n, p in model.named_parameters() if not optim.bias_and_norm(n)]
    no_decay = [p for n, p in model.named_parameters() if optim.bias_and_norm(n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=BASE_LR, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9, nesterov=True)


def our_optimizer(kind, params):
    if kind == "adamw":
        return optim.AdamW(params, lr=BASE_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                           no_decay=optim.bias_and_norm)
    return optim.SGD(params, lr=BASE_LR, momentum=0.9, nesterov=True, weight_decay=0.1,
                     no_decay=optim.bias_and_norm)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_ten_steps_match_torch(kind):
    cfg = mm.MixerConfig(**CFG)
    model = timm_mixer(cfg, seed=5, dtype=torch.float64).train()
    params = {k: v.copy() for k, v in state_dict_numpy(model).items()}
    topt, opt = torch_optimizer(kind, model), our_optimizer(kind, params)

    ref_losses, losses, clipped = [], [], 0
    for step, (x, y) in enumerate(batches(cfg)):
        lr = optim.lr_at(step, base_lr=BASE_LR, total_steps=STEPS, warmup_steps=WARMUP)
        # torch
        for g in topt.param_groups:
            g["lr"] = lr
        topt.zero_grad()
        loss_t = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), label_smoothing=0.1)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        topt.step()
        ref_losses.append(loss_t.item())
        # minimixer
        logits, cache = mm.mixer_forward(params, x, cfg)
        loss, dlogits = softmax_cross_entropy(logits, y, label_smoothing=0.1)
        _, grads = mm.mixer_backward(dlogits, cache)
        clipped += optim.clip_grad_norm(grads, CLIP) > CLIP
        opt.lr = lr
        opt.step(grads)
        losses.append(loss)

    assert clipped > 0, "the test should exercise clipping"
    print(f"{kind}: losses {' '.join(f'{v:.6f}' for v in losses)}")
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    print(f"{kind}: worst step loss rel error {loss_err:.3e}")
    assert loss_err <= 1e-9
    final = state_dict_numpy(model)
    worst = max(rel_error(params[k], final[k]) for k in final)
    print(f"{kind}: worst final param rel error {worst:.3e}")
    assert_all_close([(k, params[k], final[k]) for k in final], 1e-9)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_loss_matches_torch(kind, smoothing):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 9)) * 4
    labels = rng.integers(0, 9, 5) if kind == "hard" else rng.dirichlet(np.ones(9), 5)
    t_logits = torch.from_numpy(logits).requires_grad_(True)
    ref = F.cross_entropy(t_logits, torch.from_numpy(labels), label_smoothing=smoothing)
    ref.backward()
    loss, dlogits = softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    assert abs(loss - ref.item()) <= 1e-14 * abs(ref.item())
    assert_all_close([("dlogits", dlogits, t_logits.grad.numpy())], 1e-13)
