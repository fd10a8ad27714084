"""A new head and partial training (issue 22, item 2): `train --init-from FILE --num-classes K`
re-initializes the head as timm's reset_classifier does and says so; --freeze and
--train-blocks keep parameters bit-identical (no update, no weight decay) while the rest train."""
import math

import numpy as np
import pytest

import minimixer as mm
from minimixer import optim
from minimixer.checkpoints.registry import BUNDLED_DIGITS
from minimixer.checkpoints.safetensors_io import read_safetensors
from minimixer.commands.train import command as train_command
from minimixer.checkpoints.training_state import load_training_state as load_checkpoint
from minimixer.training.loop import TrainSettings, make_optimizer, train_step
from minimixer.training.transfer import frozen_names, reset_head

BASE = read_safetensors(BUNDLED_DIGITS)
FAST = ["--epochs", "1", "--batch-size", "256", "--warmup", "0", "--no-progress"]


def _train(tmp_path, capsys, *flags, name="run"):
    out = tmp_path / name
    code = train_command(["--init-from", BUNDLED_DIGITS, "--out", str(out), *FAST, *flags])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return read_safetensors(out / "model.safetensors"), cap.out, out


def _split(after, frozen):
    same = sorted(k for k in BASE if np.array_equal(after[k], BASE[k]))
    changed = sorted(k for k in BASE if k not in same)
    print(f"bit-identical {len(same)}, changed {len(changed)}: {changed[:6]}")
    return same, changed


def test_freeze_trunk_is_a_linear_probe(tmp_path, capsys):
    """--freeze trunk: every parameter but the head is bit-identical after training (weight decay
    0.05 and lr 2e-3 would move each of them), and both head tensors changed."""
    after, out, _ = _train(tmp_path, capsys, "--freeze", "trunk")
    assert "frozen: 52 of 54 parameter tensors" in out and "training head." in out, out
    same, changed = _split(after, None)
    assert changed == ["head.bias", "head.weight"]
    assert len(same) == 52


def test_train_blocks_trains_only_those_blocks(tmp_path, capsys):
    """--train-blocks 2-3: the stem and blocks 0-1 stay bit-identical; every tensor of blocks 2-3,
    the final norm and the head changes (blocks.*.mlp_tokens.fc2.bias has a zero gradient in
    exact arithmetic, GUIDE 4: it moves by weight decay alone, which biases are exempt from)."""
    after, out, _ = _train(tmp_path, capsys, "--train-blocks", "2-3")
    same, changed = _split(after, None)
    frozen = {k for k in BASE if k.startswith(("stem.", "blocks.0.", "blocks.1."))}
    assert frozen <= set(same), sorted(frozen - set(same))
    should_move = {k for k in BASE if k not in frozen and not k.endswith("mlp_tokens.fc2.bias")}
    assert should_move <= set(changed), sorted(should_move - set(changed))


def test_freeze_parts_and_ranges(tmp_path, capsys):
    """--freeze stem,blocks.0-2: exactly those stay; block 3, the norm and the head train."""
    after, _, _ = _train(tmp_path, capsys, "--freeze", "stem,blocks.0-2")
    same, changed = _split(after, None)
    assert {k for k in BASE if k.startswith(("stem.", "blocks.0.", "blocks.1.", "blocks.2."))} <= set(same)
    assert {"head.weight", "norm.weight", "blocks.3.mlp_channels.fc1.weight"} <= set(changed)


def test_new_head_as_reset_classifier_and_resume_keeps_frozen(tmp_path, capsys):
    """--num-classes 12 on a 10-class file: one line says the head was replaced; the new head is
    nn.Linear's init (uniform within 1/sqrt(D), not zeros); with --freeze trunk and a stop and
    --resume, the trunk is still the file's, bit for bit, and the checkpoint holds no optimizer
    state for frozen tensors."""
    out = tmp_path / "new"
    flags = ["--init-from", BUNDLED_DIGITS, "--num-classes", "12", "--freeze", "trunk", "--out", str(out),
             "--epochs", "2", "--batch-size", "256", "--warmup", "0", "--no-progress", "--lr", "0", "--min-lr", "0"]
    assert train_command([*flags, "--stop-after", "1"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if "head" in line and "replaced" in line]
    assert len(lines) == 1 and all(w in lines[0] for w in ("10-class", "12-class", "reset_classifier")), text
    state = load_checkpoint(out / "checkpoint.safetensors")
    head = state["params"]["head.weight"]
    dim = head.shape[1]
    assert head.shape == (12, dim) and np.abs(head).max() <= 1 / math.sqrt(dim) and np.abs(head).min() > 0
    assert np.abs(head).max() > 0.8 / math.sqrt(dim)  # uniform over the whole range, not a narrow init
    assert set(state["optimizer"]["state"]) == {"head.weight", "head.bias"}
    assert train_command(["--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    after = read_safetensors(out / "model.safetensors")
    assert all(np.array_equal(after[k], BASE[k]) for k in BASE if not k.startswith("head."))
    # lr 0: the head is exactly the reset one, reproducible from the seed
    w, b = reset_head(BASE, 12, 0, np.float32)
    assert np.array_equal(after["head.weight"], w) and np.array_equal(after["head.bias"], b)


def test_a_resume_cannot_change_what_is_frozen(tmp_path, capsys):
    out = tmp_path / "r"
    assert train_command(["--init-from", BUNDLED_DIGITS, "--freeze", "trunk", "--out", str(out), "--stop-after", "1",
                          *FAST]) == 0
    capsys.readouterr()
    assert train_command(["--out", str(out), "--resume", "--freeze", "stem", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--freeze stem conflicts with the checkpoint" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flags,says", [
    (["--freeze", "bogus"], "--freeze"), (["--freeze", "blocks.9"], "block 9 does not exist"),
    (["--train-blocks", "3-1"], "must be blocks like 6-7"), (["--train-blocks", "x"], "--train-blocks"),
    (["--freeze", "trunk,head"], "nothing to train")])
def test_bad_freeze_flags_are_one_line(tmp_path, capsys, flags, says):
    try:
        code = train_command([*flags, "--out", str(tmp_path / "o"), *FAST])
    except SystemExit as e:  # argparse's own exit, as the shell sees it
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    print(err)
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_frozen_step_equals_the_trainable_subset_alone():
    """One train_step with --freeze trunk equals AdamW on the head alone, with the gradient norm
    for clipping taken over the head's gradients only (as torch's clip_grad_norm_ over the
    parameters that require grad); the trunk is untouched."""
    cfg = mm.get_config("mixer_digits")
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) for k, v in BASE.items()}
    x, y = rng.standard_normal((16, 1, 8, 8)), rng.integers(0, 10, 16)
    s = TrainSettings(freeze="trunk", clip_grad=0.05, weight_decay=0.3)
    got = {k: v.copy() for k, v in params.items()}
    opt = make_optimizer(got, s)
    assert set(opt.params) == {"head.weight", "head.bias"}
    train_step(got, opt, x, y, cfg, lr=0.01, clip_grad=s.clip_grad)
    # the reference: the clear model's gradients, the head's alone clipped, the clear AdamW
    logits, cache = mm.mixer_forward(params, x, cfg)
    _, dlogits = mm.softmax_cross_entropy(logits, y)
    grads = mm.mixer_backward(dlogits, cache)[1]
    head = {k: params[k].copy() for k in ("head.weight", "head.bias")}
    hg = {k: grads[k].copy() for k in head}
    optim.clip_grad_norm(hg, s.clip_grad)
    ref = optim.AdamW(head, lr=0.01, weight_decay=0.3, no_decay=optim.bias_and_norm)
    ref.step(hg)
    diffs = {k: float(np.abs(got[k] - head[k]).max()) for k in head}
    print("max |frozen step - reference|:", diffs)
    assert max(diffs.values()) < 1e-12
    assert all(np.array_equal(got[k], params[k]) for k in params if k not in head)
    assert frozen_names(s, params) == set(params) - set(head)
