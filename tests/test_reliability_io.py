"""Reliability of eval, predict, weights and images (issue 9's items and issue 14's item 9):
no silent wrong result, no traceback for a user's mistake. Each test names its item.

The commands run in-process through cli.run (the same path as `python -m`), except where a
fresh interpreter is the point (import order, a real SIGINT, an installed copy)."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import minimixer as mm
import importlib
import minimixer.commands.eval as meval
import minimixer.commands.weights as mweights
from minimixer import data
from minimixer.commands import cli
from minimixer.checkpoints import registry
from minimixer.checkpoints import safetensors_io as sio
from minimixer.checkpoints.registry import BUNDLED_DIGITS, imagenet_classes
from test_eval import COLOR_ARGS, COLORS, color_model, write_image

mpredict = importlib.import_module("minimixer.commands.predict")  # the command (mm.predict is the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)


def run_eval(*args):
    return cli.run(meval.main, list(args), prog="python -m minimixer.eval")


def run_predict(*args):
    return cli.run(mpredict.main, list(args), prog="python -m minimixer.predict")


def stderr_lines(err):
    return [line for line in err.strip().splitlines() if line]


@pytest.fixture
def colors(tmp_path):
    """ImageFolder of 3 classes x 3 solid-color images, and the color model's weights."""
    root = tmp_path / "val"
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            write_image(root / name / f"{name}{i}.png", color)
    weights = tmp_path / "color.safetensors"
    color_model(weights, 3)
    return root, weights


def color_eval(root, weights, *extra):
    return run_eval(*COLOR_ARGS, "--num-classes", "3", "--weights", str(weights), "--data", str(root),
                    "--workers", "1", "--no-progress", *extra)


# --- item 1: non-finite weights -------------------------------------------------------------

def tiny_params(cfg):
    rng = np.random.default_rng(0)
    return {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in mm.init_params(cfg).items()}


def test_nonfinite_weights_are_refused_naming_the_first_tensor(tmp_path):
    cfg = mm.MixerConfig(**TINY)
    p = tiny_params(cfg)
    p["head.weight"][0, 0] = np.inf
    p["blocks.0.norm1.bias"][[1, 3]] = np.nan  # earlier in timm's order than head.weight
    path = tmp_path / "nan.safetensors"
    mm.save_weights(p, path)
    with pytest.raises(ValueError) as e:
        mm.load_weights(path, cfg)
    print(e.value)
    assert str(path) in str(e.value) and "'blocks.0.norm1.bias' has 2 non-finite value(s)" in str(e.value)
    assert "--allow-nonfinite" in str(e.value)
    loaded = mm.load_weights(path, cfg, allow_nonfinite=True)  # the explicit opt-out
    assert np.isnan(loaded["blocks.0.norm1.bias"][1]) and np.isinf(loaded["head.weight"][0, 0])
    # finite in the file, but not in the dtype asked for: 1e5 overflows float16
    p = tiny_params(cfg)
    p["norm.weight"][0] = 1e5
    mm.save_weights(p, path)
    assert mm.load_weights(path, cfg)["norm.weight"][0] == 1e5
    with pytest.raises(ValueError, match="'norm.weight' has 1 non-finite"):
        mm.load_weights(path, cfg, dtype="float16")


def nan_color_model(path, num_classes=3):
    color_model(path, num_classes)
    p = sio.read_safetensors(path)
    p = {k: v.copy() for k, v in p.items()}
    p["head.bias"][1] = np.nan
    mm.save_weights(p, path)


def test_eval_and_predict_refuse_nan_weights_and_json_stays_valid(colors, tmp_path, capsys):
    root, _ = colors
    weights = tmp_path / "nan.safetensors"
    nan_color_model(weights)
    assert color_eval(root, weights) == 2
    err = capsys.readouterr().err
    assert stderr_lines(err) == [f"python -m minimixer.eval: error: {weights}: tensor 'head.bias' has 1 "
                                 "non-finite value(s) (NaN or Inf) of 3; load it anyway with "
                                 "allow_nonfinite=True (--allow-nonfinite)"]
    img = str(root / "red" / "red0.png")
    assert run_predict(img, *COLOR_ARGS, "--num-classes", "3", "--weights", str(weights), "--json") == 2
    assert "non-finite" in capsys.readouterr().err
    # with the opt-out, the probabilities are NaN: JSON gets null, never a bare NaN
    assert run_predict(img, *COLOR_ARGS, "--num-classes", "3", "--weights", str(weights), "--json",
                       "--allow-nonfinite") == 0
    out = capsys.readouterr().out

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    result = json.loads(out, parse_constant=no_constants)
    assert [t["prob"] for t in result[0]["topk"]] == [None, None, None]


# --- item 2: symbolic link loops -------------------------------------------------------------

def image_tree(root, per_class=(5, 5, 5)):
    for c, n in enumerate(per_class):
        (root / str(c)).mkdir(parents=True)
        for i in range(n):
            (root / str(c) / f"{i}.png").write_bytes(b"png")  # never decoded by the scan


def test_folder_scan_follows_each_real_folder_once(tmp_path):
    root = tmp_path / "D"
    image_tree(root, (10, 10, 10))
    os.symlink(".", root / "0" / "a")  # a loop: D/0/a/a/a/...
    os.symlink("..", root / "1" / "parent")  # D itself: every class again, under class 1
    os.makedirs(root / "2" / "sub")
    (root / "2" / "sub" / "x.png").write_bytes(b"png")
    os.symlink(os.path.join(root, "2", "sub"), root / "2" / "again")  # the same folder twice
    os.symlink(os.path.join(root, "0"), root / "2" / "other")  # another class's images
    skipped = []
    samples, classes = data.find_images(str(root), on_skip=lambda p, why: skipped.append((p, why)))
    print(len(samples), skipped)
    assert classes == ["0", "1", "2"]
    assert len(samples) == 31
    assert sorted(os.path.realpath(p) for p, _ in samples) == sorted(set(os.path.realpath(p) for p, _ in samples))
    assert [sum(label == c for _, label in samples) for c in range(3)] == [10, 10, 11]
    names = {os.path.basename(p) for p, _ in skipped}
    assert names == {"a", "parent", "other", "again"} and len(skipped) == 4  # real folders before links


def test_eval_reports_what_the_scan_left_out(colors, capsys):
    root, weights = colors
    os.symlink("..", root / "blue" / "up")
    assert color_eval(root, weights) == 0
    out, err = capsys.readouterr()
    assert "images 9 " in out
    assert f"skipping {root / 'blue' / 'up'}: a link to" in err
    assert "the folder scan left out 1 folder(s) or file(s)" in err


# --- item 3: an unreadable class folder ---------------------------------------------------------

def test_unreadable_class_folder_is_named_and_counted(colors, capsys, monkeypatch):
    root, weights = colors
    locked = os.path.join(str(root), "green")
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would do (the tests may run as root, which ignores it)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(data.folders.os, "scandir", scandir)
    assert color_eval(root, weights) == 0
    out, err = capsys.readouterr()
    assert f"skipping {locked}: cannot read this folder (Permission denied)" in err
    assert "images 6 " in out and "left out 1 folder(s)" in err


# --- item 4: zero evaluated images ---------------------------------------------------------------

def test_no_readable_image_is_an_error_and_writes_no_results(colors, tmp_path, capsys):
    root, weights = colors
    for f in root.rglob("*.png"):
        f.write_bytes(b"not an image")
    out = tmp_path / "r.json"
    assert color_eval(root, weights, "--results-file", str(out)) == 2
    stdout, err = capsys.readouterr()
    assert "Acc@1" not in stdout and not out.exists()
    assert stderr_lines(err)[-1] == ("python -m minimixer.eval: error: no images were evaluated: "
                                     "all 9 could not be read (see above)")


def test_ctrl_c_before_the_first_batch_reports_nothing(colors, tmp_path, capsys, monkeypatch):
    root, weights = colors

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mm.fast, "predict", interrupted)  # what evaluate calls
    out = tmp_path / "r.json"
    assert color_eval(root, weights, "--results-file", str(out)) == 130
    stdout, err = capsys.readouterr()
    assert "Acc@1" not in stdout and not out.exists()
    assert stderr_lines(err) == ["python -m minimixer.eval: interrupted before any image was evaluated: no results"]


# --- item 5: label files ----------------------------------------------------------------------

def test_label_file_duplicates_are_errors_naming_both_lines(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("a.jpg 1\nb.jpg 2\n\na.jpg 3\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 4: 'a.jpg' is labelled twice (lines 1 and 4)")):
        data.read_label_file(str(path), ["a.jpg", "b.jpg"])
    path.write_text("ImageId,PredictionString\nval_1,n01440764 1 2 3 4\nval_1,n01443537 1 2 3 4\n")
    with pytest.raises(ValueError, match=re.escape("'val_1' is labelled twice (lines 2 and 3)")):
        data.read_label_file(str(path), ["val_1.JPEG"], {w: i for i, (w, _) in enumerate(imagenet_classes())})
    path.write_text("f0 1\nf0.png 2\n")  # the stem and the full name of one file
    with pytest.raises(ValueError, match=re.escape("f0.png is labelled twice (lines 1 and 2)")):
        data.read_label_file(str(path), ["f0.png"])


def test_label_file_matches_the_full_name_where_given(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("f0.png 3\nf0.jpg 7\n")
    assert data.read_label_file(str(path), ["f0.jpg", "f0.png"]) == [7, 3]
    path.write_text("f0 3\nf1 4\n")  # no extension: ImageNet-style ids match the stem
    assert data.read_label_file(str(path), ["f0.JPEG", "f1.png"]) == [3, 4]
    path.write_text("f0.png 3\n")
    with pytest.raises(ValueError, match="no label for 1 image"):
        data.read_label_file(str(path), ["f0.jpg"])


def test_label_file_bom_and_decode_errors(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffa.jpg 1\nb.jpg 2\n".encode("utf-8"))
    assert data.read_label_file(str(path), ["a.jpg", "b.jpg"]) == [1, 2]
    path.write_bytes("\ufeffImageId,PredictionString\nval_1,5 1 2 3 4\n".encode("utf-8"))
    assert data.read_label_file(str(path), ["val_1.JPEG"]) == [5]
    path.write_bytes(b"a.jpg 1\nb.jpg \xff\xfe2\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: not UTF-8 text (invalid start byte at byte 14)")):
        data.read_label_file(str(path), ["a.jpg", "b.jpg"])
    path.write_text("a.jpg \u00b2\n")  # a Unicode digit is not an index
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: unknown label")):
        data.read_label_file(str(path), ["a.jpg"])


# --- item 6: ImageNet wnid folders with a stray one ----------------------------------------------

def test_stray_folder_among_wnids_is_an_error(tmp_path, capsys):
    root = tmp_path / "val"
    wnids = [w for w, _ in imagenet_classes()[:3]]
    for name, color in zip(wnids + ["misc"], ["blue", "green", "red", "red"]):
        (root / name).mkdir(parents=True)
        write_image(root / name / "x.png", COLORS[color])
    weights = tmp_path / "color1000.safetensors"
    color_model(weights, 1000)
    args = (*COLOR_ARGS, "--weights", str(weights), "--data", str(root), "--no-progress")
    assert run_eval(*args) == 2
    assert stderr_lines(capsys.readouterr().err) == [
        f"python -m minimixer.eval: error: {root}: 3 of 4 class folders are ImageNet wnids, but misc is not "
        "an ImageNet wnid: move it out (the labels would be sorted positions, not ImageNet's)"]
    shutil.rmtree(root / "misc")
    assert run_eval(*args) == 0 and "Acc@1 100.000" in capsys.readouterr().out
    (root / "n99999999").mkdir()  # a wnid, but not one of ImageNet-1k's
    write_image(root / "n99999999" / "x.png", COLORS["red"])
    assert run_eval(*args) == 2 and "but n99999999 is not an ImageNet-1k class" in capsys.readouterr().err


# --- item 13: Ctrl-C ----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["find_images", "find_weights", "load_weights"])
def test_ctrl_c_during_start_up_or_scan_is_one_line_130(colors, capsys, monkeypatch, where):
    root, weights = colors

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    from minimixer.checkpoints import convert, registry
    owner = {"find_images": meval, "find_weights": registry, "load_weights": convert}[where]  # where eval reaches it
    monkeypatch.setattr(owner, where, interrupted)
    assert color_eval(root, weights) == 130
    assert stderr_lines(capsys.readouterr().err) == ["python -m minimixer.eval: interrupted"]


def test_ctrl_c_in_predict_keeps_the_results_already_printed(colors, capsys, monkeypatch):
    root, weights = colors
    calls = []

    def predict_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return mm.predict(*args)

    monkeypatch.setattr(mpredict, "predict", predict_then_interrupt)
    images = [str(root / c / f"{c}{i}.png") for c in ("blue", "green") for i in range(3)]
    args = (*images, *COLOR_ARGS, "--num-classes", "3", "--weights", str(weights), "--batch-size", "2", "--topk", "1")
    assert run_predict(*args) == 130
    out, err = capsys.readouterr()
    assert out.split("\n")[::2][:2] == images[:2] and images[2] not in out  # the first batch, printed
    assert stderr_lines(err) == ["python -m minimixer.predict: interrupted after 2 of 6 images"]
    calls.clear()
    assert run_predict(*args, "--json") == 130
    assert [r["file"] for r in json.loads(capsys.readouterr().out)] == images[:2]


def test_ctrl_c_in_weights_download(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mweights, "download", interrupted)
    assert cli.run(mweights.main, ["download", "mixer_b16_224"], prog="python -m minimixer.weights") == 130
    assert stderr_lines(capsys.readouterr().err) == ["python -m minimixer.weights: interrupted"]


# --- item 14: only regular files -------------------------------------------------------------------

def in_thread(fn, timeout=10):
    """fn() in a thread: (finished, result or exception). A FIFO would block open() forever."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["result"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box.get("result")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_only_regular_files_are_read(tmp_path, colors, capsys):
    root, weights = colors
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    try:
        cfg = mm.get_config("mixer_digits")
        done, result = in_thread(lambda: mm.load_weights(fifo, cfg))
        assert done, "reading a FIFO blocked"
        assert isinstance(result, ValueError) and f"{fifo}: not a regular file" in str(result)
        with pytest.raises(ValueError, match="/dev/null: not a regular file"):
            mm.load_weights("/dev/null", cfg)  # a device: /dev/zero would be read without end
        done, result = in_thread(lambda: data.read_label_file(str(fifo), ["a.png"]))
        assert done and isinstance(result, ValueError) and f"{fifo}: not a regular file" in str(result)
        # an image that is a FIFO: refused by name in predict, left out of a folder scan
        os.mkfifo(root / "red" / "pipe.png")
        done, code = in_thread(lambda: run_predict(str(root / "red" / "pipe.png"), *COLOR_ARGS, "--num-classes", "3",
                                                   "--weights", str(weights)))
        assert done and code == 2
        assert f"cannot read image {root / 'red' / 'pipe.png'}: not a regular file" in capsys.readouterr().err
        skipped = []
        samples, _ = data.find_images(str(root), on_skip=lambda p, why: skipped.append((p, why)))
        assert len(samples) == 9 and skipped == [(str(root / "red" / "pipe.png"), "not a regular file")]
    finally:  # release any reader still blocked on a FIFO
        for f in (fifo, root / "red" / "pipe.png"):
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


# --- item 15: pixel limits ---------------------------------------------------------------------------

def test_a_long_strip_is_refused_before_resizing(tmp_path, colors, capsys):
    _, weights = colors
    strip = tmp_path / "strip.png"
    Image.new("RGB", (100_000, 1), COLORS["red"]).save(strip)
    start = time.perf_counter()  # the color model resizes the short side to 36: 3,600,000 x 36 pixels
    assert run_predict(str(strip), *COLOR_ARGS, "--num-classes", "3", "--weights", str(weights)) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {strip}: resizing 100000x1 would give 3600000x36 = 129600000 pixels" in err
    assert "MAX_IMAGE_PIXELS" in err and time.perf_counter() - start < 10
    # B/16's eval transform (256): 25,600,000 x 256 = 6.5 G pixels, 20 GB of RGB
    transform = data.eval_transform(224)
    with pytest.raises(ValueError, match="25600000x256"):
        transform(Image.new("RGB", (100_000, 1)))


def test_decompression_bomb_is_an_error_naming_the_file(colors, capsys, monkeypatch):
    root, weights = colors
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the images are 40x36 = 1440 pixels
    img = str(root / "red" / "red0.png")
    assert run_predict(img, *COLOR_ARGS, "--num-classes", "3", "--weights", str(weights)) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"cannot read image {img}:" in err and "1440 pixels" in err
    with warnings.catch_warnings(), pytest.raises(ValueError, match="40x36 = 1440 pixels, over the limit of 1000"):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # as without the command's filter
        data.open_image(img)  # the library refuses it too
    assert color_eval(root, weights, "--strict") == 2
    assert "cannot read image" in capsys.readouterr().err


# --- item 16: an empty batch -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_on_an_empty_batch(dtype):
    cfg = mm.get_config("mixer_digits")
    params = {k: v.astype(dtype) for k, v in mm.init_params(cfg).items()}
    out = mm.predict(params, np.zeros((0, 1, 8, 8), dtype), cfg)
    assert out.shape == (0, 10) and out.dtype == dtype


# --- item 18: the bundled model is package data ---------------------------------------------------------

def test_bundled_digits_model_is_package_data():
    package = os.path.dirname(mm.__file__)
    assert os.path.commonpath([BUNDLED_DIGITS, package]) == package and os.path.isfile(BUNDLED_DIGITS)
    assert os.path.dirname(BUNDLED_DIGITS) == os.path.join(package, "assets")  # pyproject: assets/*


def test_non_editable_install_runs_eval(tmp_path):
    """`pip install .` (a wheel, not editable) into a fresh venv; eval, run from elsewhere,
    must find the digits model in the installed package. The venv gets no copies of the
    dependencies: they come from this environment's site-packages on PYTHONPATH, where
    the editable install's .pth hook is not run, so minimixer itself is the venv's."""
    import sysconfig
    tree = os.path.dirname(os.path.dirname(mm.__file__))  # the checkout under test
    src = tmp_path / "src"  # a clean copy: the build writes build/ and *.egg-info beside its sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(tree, name), src / name)
    shutil.copytree(os.path.join(tree, "minimixer"), src / "minimixer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    # build offline with this environment's setuptools where it can make wheels (setuptools >= 70.1,
    # or the wheel package); else pip fetches a build backend (Python >= 3.12 venvs have none)
    can_build = importlib.util.find_spec("setuptools") is not None and (
        importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
        or importlib.util.find_spec("wheel") is not None)
    offline = ["--no-build-isolation", "--no-index"] if can_build else []
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "--quiet", "-w", str(wheels),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("minimixer-*.whl")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout's *.egg-info: 'installed'
    r = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                        "--quiet", str(wheel)], capture_output=True, text=True, timeout=300, env=clean)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    r = subprocess.run([python, "-c", "import minimixer; print(minimixer.__file__)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    installed = os.path.dirname(r.stdout.strip())
    assert installed.startswith(str(venv)), r.stderr
    assert os.path.isfile(os.path.join(installed, "assets", "mixer_digits.safetensors"))
    r = subprocess.run([python, "-m", "minimixer.eval", "--no-progress"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Acc@1 99.155" in r.stdout
    assert "weights venv/lib/" in r.stdout.replace(os.sep, "/")  # the installed file (shown relative to the cwd)


# --- item 19: --results-file is checked first -------------------------------------------------------------

@pytest.mark.parametrize("where", ["missing/r.json", "folder.csv"])
def test_bad_results_file_is_found_before_evaluating(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "folder.csv").mkdir()
    path = tmp_path / where

    def not_now(*args):
        raise AssertionError("evaluated before checking --results-file")

    monkeypatch.setattr(mm.fast, "predict", not_now)  # what evaluate calls
    assert run_eval("--results-file", str(path), "--no-progress") == 2
    err = capsys.readouterr().err
    assert stderr_lines(err) == [f"python -m minimixer.eval: error: cannot write {path}: "
                                 + ("no such directory " + str(tmp_path / "missing") if "missing" in where
                                    else "it is a directory")]
    assert ".tmp-" not in err


def test_write_failure_names_the_target_not_the_temp_file(tmp_path):
    target = tmp_path / "gone" / "m.safetensors"
    with pytest.raises(OSError) as e:
        sio.atomic_write_bytes(target, b"x")
    assert str(e.value).startswith(f"[Errno 2] cannot write {target}") and ".tmp-" not in str(e.value)


# --- item 20: orphaned temporary files ---------------------------------------------------------------------

def test_orphaned_temp_files_are_removed_on_the_next_write(tmp_path):
    cfg = mm.MixerConfig(**TINY)
    path = tmp_path / "m.safetensors"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that no longer runs
    old = time.time() - 3600
    orphans = [tmp_path / f".tmp-{gone.pid}-abcd1234m.safetensors",
               tmp_path / ".tmp-x_9y8z7wm.safetensors"]  # no pid (older versions): by age
    kept = [tmp_path / f".tmp-{gone.pid}-abcd1234other.safetensors",  # another file's: not ours to judge
            tmp_path / f".tmp-{os.getppid()}-abcd1234m.safetensors",  # its writer still runs
            tmp_path / ".tmp-notesm.safetensors",  # not our pattern: a user's file
            tmp_path / ".tmp-newer123m.safetensors",  # newer than this process: a live writer's
            tmp_path / "m.safetensors.bak"]
    for f in orphans + kept:
        f.write_bytes(b"partial")
        os.utime(f, (old, old))
    os.utime(kept[3], None)  # now
    mm.save_weights(tiny_params(cfg), path)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors"] + [f.name for f in kept])
    assert mm.load_weights(path, cfg)  # and the write itself went through


# --- item 21: rough edges ------------------------------------------------------------------------------------

def test_progress_bar_reaches_the_total_when_images_are_skipped(colors, capsys):
    root, weights = colors
    (root / "green" / "broken.png").write_bytes(b"not a png")
    assert run_eval(*COLOR_ARGS, "--num-classes", "3", "--weights", str(weights), "--data", str(root),
                    "--workers", "1", "--batch-size", "4") == 0
    err = capsys.readouterr().err
    bar = err.replace("\r", "\n").strip().splitlines()
    last = [line for line in bar if line.startswith("eval ")][-1]
    print(last)
    assert "100%" in last and "10/10" in last


def test_shape_mismatch_names_the_first_few_and_the_count():
    with pytest.raises(ValueError) as e:
        mm.load_weights(BUNDLED_DIGITS, mm.get_config("mixer_b16_224"))
    msg = str(e.value)
    print(msg)
    # another variant altogether is named as such (issue 23 item 7), as the .pth path does
    assert msg == (f"{BUNDLED_DIGITS} holds mixer_digits (4 blocks, width 64, patch 2, 8x8 input, 10 classes); "
                   "the model asked for is mixer_b16_224 (12 blocks, width 768, patch 16, 224x224 input, "
                   "1000 classes)")
    # the same width and patch with fewer blocks: the missing keys, the first few and the count
    with pytest.raises(ValueError) as e:
        mm.load_weights(BUNDLED_DIGITS, mm.get_config("mixer_digits", num_blocks=12))
    msg = str(e.value)
    assert "missing 96: blocks.4.norm1.weight, blocks.4.norm1.bias," in msg and "unexpected" not in msg
    with pytest.raises(ValueError) as e:
        mm.load_weights(BUNDLED_DIGITS, mm.get_config("mixer_digits", num_blocks=2))
    msg = str(e.value)
    assert "unexpected 24: " in msg and "... (19 more)" in msg
    assert len(msg) < 1000


def test_weights_download_does_not_suggest_a_flag_it_lacks(capsys, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise registry.DownloadError("offline")

    monkeypatch.setattr(registry, "fetch", offline)
    monkeypatch.setenv("MINIMIXER_CACHE", str(tmp_path))  # nothing cached: every name is fetched
    for name in ("mixer_s16_224", "mixer_b16_224"):
        assert cli.run(mweights.main, ["download", name], prog="python -m minimixer.weights") == 2
        err = capsys.readouterr().err
        assert "--weights" not in err and len(stderr_lines(err)) <= 2, err  # 'fetching ...' and the error
    assert "save it as weights/mixer_b16_224.goog_in21k_ft_in1k.safetensors" in err
    # eval and predict, which have --weights, do suggest it
    with pytest.raises(registry.WeightsNotFound, match=r"save it as weights/\S+, or pass --weights PATH"):
        registry.find_weights("mixer_b16_224")


def test_weights_readme_names_the_files_that_download_writes():
    text = open(os.path.join(ROOT, "weights", "README.md")).read()
    named = set(re.findall(r"weights/(mixer_[\w.]+?\.safetensors)", text))
    print(named)
    writes = {registry.local_name(m) for m in ("mixer_b16_224", "mixer_l16_224")}
    assert writes <= named
    assert named <= writes | {registry.local_name(t) for t in registry.CHECKPOINTS}


# --- item 22: timm's flag spellings --------------------------------------------------------------------------

def test_eval_accepts_timms_spellings_with_one_definition_each(capsys):
    timm_style = meval.parse_args(["val/", "-b", "8", "-j", "3", "--checkpoint", "w.safetensors"])
    ours = meval.parse_args(["--data", "val/", "--batch-size", "8", "--workers", "3", "--weights", "w.safetensors"])
    assert vars(timm_style) | {"data_dir": None} == vars(ours)
    assert meval.parse_args(["--data-dir", "val/"]).data == "val/"
    assert meval.parse_args([]).data == "digits"
    p = mpredict.parse_args(["x.png", "-b", "4", "--checkpoint", "w.safetensors"])
    assert (p.batch_size, p.weights) == (4, "w.safetensors")
    with pytest.raises(SystemExit):
        meval.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for one in ("-b BATCH_SIZE, --batch-size BATCH_SIZE", "-j WORKERS, --workers WORKERS",
                "--weights FILE, --checkpoint FILE", "--data DIR, --data-dir DIR"):
        assert one in help_text  # each spelling pair is one option, shown together


def test_data_given_two_ways_must_agree(capsys):
    with pytest.raises(SystemExit) as e:
        meval.parse_args(["a/", "--data", "b/"])
    assert e.value.code == 2
    assert "the data is given twice: DIR a/ and --data b/" in capsys.readouterr().err
    assert meval.parse_args(["a/", "--data-dir", "a/"]).data == "a/"


# --- issue 14, item 9: mm.predict and the predict command -----------------------------------------------------

ORDERS = {
    "command first": "import minimixer.predict\n",
    "function first": "mm.predict(params, x, cfg)\nimport minimixer.predict\n",
    "from-import": "from minimixer import predict\nimport minimixer.predict\n",
}


@pytest.mark.parametrize("order", ORDERS)
def test_mm_predict_works_whatever_was_imported_first(order):
    """`python -m minimixer.predict` is the command and `mm.predict` the function: importing the
    command's entry point stops with a line that points to both, and the function stays bound."""
    code = ("import numpy as np, minimixer, minimixer as mm\n"
            "cfg = minimixer.get_config('mixer_digits')\n"
            "params = minimixer.init_params(cfg, seed=1)\n"
            "x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)\n"
            "try:\n" + "".join("    " + line + "\n" for line in ORDERS[order].splitlines()) +
            "except ImportError as e:\n"
            "    assert 'mm.predict' in str(e) and 'minimixer.commands.predict' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('import minimixer.predict did not stop')\n"
            "import sys\n"
            "from minimixer import fast, model\n"
            "got = mm.predict(params, x, cfg)\n"
            "assert mm.predict is fast.predict and minimixer.predict is fast.predict\n"
            "assert 'minimixer.predict' not in sys.modules\n"
            "print('max diff vs the clear path', float(np.abs(got - model.predict(params, x, cfg)).max()))\n"
            "from minimixer.commands.predict import main\n"
            "assert main is sys.modules['minimixer.commands.predict'].main\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
