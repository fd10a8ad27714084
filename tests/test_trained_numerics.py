"""Files that carry their numerics (issue 22, item 5): `train` writes ln_eps, gelu, img_size, the
preprocessing and the class names into model.safetensors, and eval and predict apply them,
so evaluating a trained model reproduces the accuracy training reported."""
import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from PIL import Image

import minimixer as mm
from minimixer.checkpoints.convert import config_for_file, read_checkpoint, trained_metadata
from minimixer.checkpoints.registry import BUNDLED_DIGITS, class_names, data_config
from minimixer.checkpoints.safetensors_io import save_weights
from minimixer.commands.eval import main as eval_main
from minimixer.commands.predict import main as predict_main
from minimixer.commands.train import main as train_main


def _metadata(path):
    with safetensors.safe_open(str(path), framework="np") as f:
        return f.metadata()


def _strip_metadata(src, dst):
    """The same tensors with only {'format': 'pt'}: what train wrote before this fix."""
    with safetensors.safe_open(str(src), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.numpy.save_file(arrays, str(dst), metadata={"format": "pt"})


def _eval_top1(tmp_path, weights, name):
    results = tmp_path / f"{name}.json"
    assert eval_main(["--weights", str(weights), "--no-progress", "--results-file", str(results)]) == 0
    return json.loads(results.read_text())["top1"]


def test_eval_reproduces_the_accuracy_training_reported(tmp_path, capsys):
    """Trained with --ln-eps 0.5 (and the tanh GELU), `eval --weights out/model.safetensors`
    gives the accuracy the last epoch reported, to all four decimals eval prints; the same
    tensors without the metadata do not (as on main: 87.32% reported, 80.845% evaluated)."""
    out = tmp_path / "run"
    assert train_main(["--ln-eps", "0.5", "--gelu", "tanh", "--epochs", "1", "--batch-size", "128", "--lr", "0.01",
                       "--warmup", "0", "--out", str(out), "--no-progress"]) == 0
    reported = json.loads((out / "metrics.json").read_text())[-1]["test_top1"]
    meta = _metadata(out / "model.safetensors")
    print("metadata:", meta)
    assert (meta["ln_eps"], meta["gelu"], json.loads(meta["img_size"])) == ("0.5", "tanh", 8)
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)] and meta["preprocessing"] == "digits"
    evaluated = _eval_top1(tmp_path, out / "model.safetensors", "with")
    _strip_metadata(out / "model.safetensors", tmp_path / "bare.safetensors")
    bare = _eval_top1(tmp_path, tmp_path / "bare.safetensors", "bare")
    capsys.readouterr()
    print(f"reported {reported:.4f}  eval with metadata {evaluated:.4f}  without {bare:.4f}")
    assert evaluated == round(reported, 4), (evaluated, reported)
    assert bare != evaluated, "the numerics do not move the accuracy here: the test would prove nothing"


def _digits_file(tmp_path, cfg, meta, name="w.safetensors"):
    params = mm.init_params(cfg, seed=3)
    rng = np.random.default_rng(4)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # no zero head
    path = tmp_path / name
    save_weights(params, path, metadata=meta)
    return path, params


def test_predict_and_eval_apply_recorded_size_preprocessing_and_classes(tmp_path, capsys):
    """A file recording a 12x12 input (the preset's is 8), its own preprocessing and class names:
    predict runs it at that size with that transform and prints those names, with the
    probabilities of the recorded pipeline done by hand; eval's results row shows the crop."""
    cfg = mm.get_config("mixer_digits").replace(img_size=12, num_classes=3)
    pre = {"mean": [0.25], "std": [0.75], "crop_pct": 0.5, "interpolation": "bilinear", "pipeline": "timm"}
    names = ["cat", "dog", "eel"]
    path, params = _digits_file(tmp_path, cfg, trained_metadata(cfg, "mine", {"preprocessing": pre, "classes": names}))
    got = config_for_file(path, mm.get_config("mixer_digits"))
    assert (got.image_hw, got.num_classes) == ((12, 12), 3), got
    dcfg = data_config("mixer_digits", str(path))
    assert (dcfg.mean, dcfg.std, dcfg.crop_pct, dcfg.interpolation) == ((0.25,), (0.75,), 0.5, "bilinear"), dcfg
    assert class_names("mixer_digits", 3, str(path)) == names
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50), dtype=np.uint8)).save(img)
    assert predict_main([str(img), "--weights", str(path), "--json", "--topk", "3"]) == 0
    shown = json.loads(capsys.readouterr().out)[0]["topk"]
    from minimixer.data import eval_transform, open_image
    x = eval_transform(12, crop_pct=0.5, interpolation="bilinear", mean=(0.25,), std=(0.75,))(open_image(str(img), "L"))
    logits = mm.predict({k: v.astype(np.float32) for k, v in params.items()}, x[None], cfg).astype(np.float64)[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")
    print(shown, probs)
    assert [t["index"] for t in shown] == order.tolist()
    assert [t["label"] for t in shown] == [names[i] for i in order]
    assert max(abs(t["prob"] - probs[i]) for t, i in zip(shown, order)) < 1e-6


@pytest.mark.parametrize("key,value,says", [
    ("img_size", "\"big\"", "an image size"), ("img_size", "0", "an image size"),
    ("data_config", json.dumps({"mean": [0.5], "std": [0], "crop_pct": 1, "interpolation": "box",
                                "pipeline": "timm"}), "a preprocessing"),
    ("data_config", "[1, 2]", "a preprocessing"), ("classes", "{\"a\": 1}", "a list of class names"),
    ("classes", "not json", "a list of class names")])
def test_bad_recorded_metadata_is_one_line(tmp_path, capsys, key, value, says):
    cfg = mm.get_config("mixer_digits")
    path, _ = _digits_file(tmp_path, cfg, {**trained_metadata(cfg), key: value})
    with pytest.raises(ValueError, match=says) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    from minimixer.commands.eval import command
    assert command(["--weights", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and key in err, err


def test_files_without_the_new_entries_read_as_before():
    """The bundled weights and converted files record none of them: nothing changes."""
    ck = read_checkpoint(BUNDLED_DIGITS, load=False)
    assert (ck.img_size, ck.data, ck.classes) == (None, None, None)
    assert class_names("mixer_digits", 10, BUNDLED_DIGITS) == [str(i) for i in range(10)]


def _folder(root, rng, classes=("ant", "bee", "cat"), per_class=6):
    """train/ and val/ in ImageFolder layout: each class a different mean colour, plus noise."""
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            os.makedirs(root / split / name)
            for j in range(per_class):
                base = np.zeros((40, 48, 3)) + 60 * i + 40
                pixels = np.clip(base + rng.normal(0, 50, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{j}.png")


def test_image_folder_run_carries_size_preprocessing_and_class_names(tmp_path, capsys):
    """Trained on an ImageFolder at --img-size 32: model.safetensors records the input size,
    the validation transform and the folder names; eval on val/ (no --img-size given)
    reproduces the reported accuracy, and predict labels with the folder names."""
    _folder(tmp_path / "data", np.random.default_rng(0))
    geometry = ["--model", "mixer_s32_224", "--num-blocks", "1", "--embed-dim", "16"]
    out = tmp_path / "run"
    assert train_main([*geometry, "--img-size", "32", "--data", str(tmp_path / "data"), "--epochs", "2",
                       "--batch-size", "6", "--lr", "0.01", "--warmup", "0", "--out", str(out), "--no-progress",
                       "-j", "1"]) == 0
    reported = json.loads((out / "metrics.json").read_text())[-1]["test_top1"]
    meta = _metadata(out / "model.safetensors")
    assert json.loads(meta["img_size"]) == 32 and json.loads(meta["classes"]) == ["ant", "bee", "cat"]
    assert json.loads(meta["data_config"]) == {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
                                               "interpolation": "bicubic", "pipeline": "timm"}
    results = tmp_path / "r.json"
    assert eval_main([*geometry, "--weights", str(out / "model.safetensors"), "--data", str(tmp_path / "data" / "val"),
                      "--no-progress", "--results-file", str(results), "-j", "1"]) == 0
    row = json.loads(results.read_text())
    print(f"reported {reported:.4f}, eval {row['top1']:.4f} at {row['img_size']}")
    assert row["top1"] == round(reported, 4) and row["img_size"] == 32
    capsys.readouterr()
    img = str(tmp_path / "data" / "val" / "bee" / "0.png")
    assert predict_main([img, *geometry, "--weights", str(out / "model.safetensors"), "--json", "--topk", "3"]) == 0
    labels = [t["label"] for t in json.loads(capsys.readouterr().out)[0]["topk"]]
    assert sorted(labels) == ["ant", "bee", "cat"]
