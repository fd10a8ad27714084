"""timm's own files, live (issue 22, item 4): checkpoints that timm's CheckpointSaver writes
(state_dict, state_dict_ema from ModelEmaV3, optimizer, args as an argparse.Namespace), and
state dicts of DataParallel ('module.') and torch.compile ('_orig_mod.') models. minimixer
predicts on the real photos in tests/images as timm does (top-5 equal), --use-ema as timm's
EMA model, and eval, train --init-from and weights convert read the same files.

The model is a 224x224, patch-32, 1000-class Mixer with 2 blocks of width 64 (small files),
with deterministic non-trivial weights (timm zero-initializes heads and biases: perturbed).
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.timm

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

import minimixer as mm  # noqa: E402
from minimixer.checkpoints.convert import read_checkpoint  # noqa: E402
from minimixer.commands.eval import command as eval_command  # noqa: E402
from minimixer.commands.predict import command as predict_command  # noqa: E402
from minimixer.commands.train import command as train_command  # noqa: E402
from minimixer.commands.weights import main as weights_main  # noqa: E402
from minimixer.data import digits_split  # noqa: E402
from support.timm_reference import timm_mixer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = sorted(glob.glob(os.path.join(ROOT, "tests", "images", "*.jpg")))
CFG = mm.get_config("mixer_s32_224").replace(num_blocks=2, embed_dim=64)
MODEL_FLAGS = ["--model", "mixer_s32_224", "--num-blocks", "2", "--embed-dim", "64"]


def _train_like(model, seed):
    """What a few epochs do, cheaply: an EMA (decay 0.5) that lags a moved model, and AdamW
    state from one step on random gradients."""
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(model, decay=0.5)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
            p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    ema.update(model, step=10)
    return ema, opt


def _saver_files(model, ema, opt, folder, arch):
    from timm.utils import CheckpointSaver
    args = argparse.Namespace(model=arch, lr=1e-3, epochs=3, mean=(0.5, 0.5, 0.5), model_kwargs={}, smoothing=None)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(folder), max_history=2)
    saver.save_checkpoint(epoch=1, metric=42.0)
    return {n: os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".pth.tar")}


@pytest.fixture(scope="module")
def photos_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm_ckpt")
    model = timm_mixer(CFG, seed=11)
    ema, opt = _train_like(model, 12)
    model.eval()
    ema.module.eval()
    files = _saver_files(model, ema, opt, folder, "mixer_s32_224")
    torch.save(torch.nn.DataParallel(model).state_dict(), folder / "dataparallel.pth")
    compiled = torch.compile(model)
    torch.save(compiled.state_dict(), folder / "compiled.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in compiled.state_dict().items()}, str(folder / "compiled.safetensors"))
    files.update({n: str(folder / n) for n in ("dataparallel.pth", "compiled.pth", "compiled.safetensors")})
    from PIL import Image
    transform = timm.data.create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.5,) * 3,
                                           std=(0.5,) * 3, crop_pct=0.875)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in IMAGES])
    with torch.inference_mode():
        ref = {"model": torch.softmax(model(x).double(), 1).numpy(),
               "ema": torch.softmax(ema.module(x).double(), 1).numpy()}
    return files, ref


def _predict(capsys, weights, *extra):
    capsys.readouterr()  # this test's own prints so far
    code = predict_command([*IMAGES, *MODEL_FLAGS, "--weights", weights, "--json", "--topk", "5", *extra])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads(cap.out), cap.err


def _check_top5(rows, probs, what):
    for row, p in zip(rows, probs):
        want = np.argsort(-p, kind="stable")[:5].tolist()
        got = [t["index"] for t in row["topk"]]
        err = max(abs(t["prob"] - p[t["index"]]) for t in row["topk"])
        print(f"{what} {os.path.basename(row['file'])}: timm {want} minimixer {got} max|dprob| {err:.2e}")
        assert got == want
        assert err < 1e-5


def test_checkpoint_saver_files_predict_as_timm(photos_setup, capsys):
    """checkpoint-1.pth.tar, model_best.pth.tar and last.pth.tar: state_dict by default (with a
    note naming the EMA weights and the unused optimizer state), state_dict_ema with
    --use-ema; top-5 on the photos equal timm's model and timm's EMA model respectively."""
    files, ref = photos_setup
    assert {"checkpoint-1.pth.tar", "model_best.pth.tar", "last.pth.tar"} <= set(files), sorted(files)
    assert not np.array_equal(np.argsort(-ref["model"], 1)[:, :5], np.argsort(-ref["ema"], 1)[:, :5]) or \
        np.abs(ref["model"] - ref["ema"]).max() > 1e-4  # the EMA model is another model
    for name in ("checkpoint-1.pth.tar", "model_best.pth.tar", "last.pth.tar"):
        rows, err = _predict(capsys, files[name])
        note = err.strip()
        assert note.startswith("python -m minimixer.predict: note: ") and len(note.splitlines()) == 1, err
        assert all(w in note for w in ("a training checkpoint (epoch 1)", "--use-ema", "optimizer state (not used)"))
        _check_top5(rows, ref["model"], name)
        rows, _ = _predict(capsys, files[name], "--use-ema")
        _check_top5(rows, ref["ema"], name + " --use-ema")


@pytest.mark.parametrize("name,prefix", [("dataparallel.pth", "module."), ("compiled.pth", "_orig_mod."),
                                         ("compiled.safetensors", "_orig_mod.")])
def test_wrapped_state_dicts_predict_as_timm(photos_setup, capsys, name, prefix):
    files, ref = photos_setup
    ck = read_checkpoint(files[name], load=False)
    assert "stem.proj.weight" in ck.params  # the prefix is gone ...
    if name.endswith(".pth"):
        from minimixer.checkpoints.pth import read_pth
        assert all(k.startswith(prefix) for k in read_pth(files[name], load=False))  # ... it was there
    rows, _ = _predict(capsys, files[name])
    _check_top5(rows, ref["model"], name)


def test_namespace_is_data_and_argparse_is_never_imported(photos_setup):
    """The args Namespace reads back as plain data, in a process where importing argparse fails."""
    files, _ = photos_setup
    code = ("import sys\nsys.modules['argparse'] = None  # any import of it raises ImportError\n"
            "from minimixer.checkpoints.pth import read_pth\n"
            "o = read_pth(sys.argv[1])\n"
            "print(type(o['args']).__name__, o['args'].model, o['args'].mean, o['epoch'], o['metric'])\n")
    r = subprocess.run([sys.executable, "-c", code, files["last.pth.tar"]], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0 and r.stdout.split() == ["SimpleNamespace", "mixer_s32_224", "(0.5,", "0.5,", "0.5)",
                                                      "1", "42.0"]


def test_use_ema_mistakes_are_one_line(photos_setup, capsys):
    files, _ = photos_setup
    for name, says in (("dataparallel.pth", "holds no EMA weights"), ("compiled.safetensors", "one set of weights")):
        assert predict_command([IMAGES[0], *MODEL_FLAGS, "--weights", files[name], "--use-ema"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm_digits")
    cfg = mm.get_config("mixer_digits")
    model = timm_mixer(cfg, seed=21)
    ema, opt = _train_like(model, 22)
    model.eval()
    ema.module.eval()
    files = _saver_files(model, ema, opt, folder, "mixer_digits")
    _, _, x, y = digits_split()
    with torch.inference_mode():
        acc = {k: round(100.0 * float((m(torch.from_numpy(x)).argmax(1).numpy() == y).mean()), 4)
               for k, m in (("model", model), ("ema", ema.module))}
    return files, acc, model, ema.module


def test_eval_use_ema_is_timms_ema_model(digits_setup, capsys, tmp_path):
    """eval on the digits: the checkpoint's top-1 is timm's model's, and with --use-ema timm's
    EMA model's."""
    files, acc, _, _ = digits_setup
    print("timm top-1:", acc)
    for flags, want in (([], acc["model"]), (["--use-ema"], acc["ema"])):
        results = tmp_path / "r.json"
        assert eval_command(["--weights", files["last.pth.tar"], "--no-progress", "--results-file", str(results),
                             *flags]) == 0
        capsys.readouterr()
        assert json.loads(results.read_text())["top1"] == want, (flags, want)


def test_init_from_and_convert_read_timm_checkpoints(digits_setup, capsys, tmp_path):
    """train --init-from checkpoint.pth.tar (lr 0: the weights pass through unchanged) and
    weights convert both read its state_dict, exactly."""
    files, _, model, ema = digits_setup
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    assert train_command(["--init-from", files["checkpoint-1.pth.tar"], "--out", str(out), "--epochs", "1",
                          "--batch-size", "512", "--lr", "0", "--min-lr", "0", "--warmup", "0",
                          "--no-progress"]) == 0
    assert "optimizer state (not used)" in capsys.readouterr().out
    got = mm.checkpoints.safetensors_io.read_safetensors(out / "model.safetensors")
    assert all(np.array_equal(got[k], want[k]) for k in want)
    conv = tmp_path / "c.safetensors"
    assert weights_main(["convert", files["checkpoint-1.pth.tar"], "--out", str(conv)]) == 0
    got = mm.checkpoints.safetensors_io.read_safetensors(conv)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert weights_main(["convert", files["checkpoint-1.pth.tar"], "--out", str(conv), "--use-ema"]) == 0
    got = mm.checkpoints.safetensors_io.read_safetensors(conv)
    assert all(np.array_equal(got[k], v.detach().numpy()) for k, v in ema.state_dict().items())
