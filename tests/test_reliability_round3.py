"""Reliability, round 3 (issue 23, items 1, 3, 4, 6, 7): nothing silently wrong, every signal
handled. Each test names its item; each failed on fb2e9ae.

The commands run in-process through cli.run (the path of `python -m`), except where a fresh
interpreter is the point (a real signal, a locale, a second process holding a lock)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minimixer as mm
import minimixer.commands.eval as meval
from minimixer import data, fast
from minimixer.commands import cli
from test_eval import COLOR_ARGS, color_model, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLUE, GREEN, RED = (20, 30, 220), (30, 200, 40), (210, 25, 35)


def exit_status(call):
    """The exit status of a command run in-process: argparse's errors exit with SystemExit."""
    try:
        return call()
    except SystemExit as e:
        return e.code


def run_eval(*args):
    return exit_status(lambda: cli.run(meval.main, list(args), prog="python -m minimixer.eval"))


def color_eval(root, weights, *extra, classes=3):
    return run_eval(*COLOR_ARGS, "--num-classes", str(classes), "--weights", str(weights), "--data", str(root),
                    "--workers", "1", "--no-progress", *extra)


def one_line_error(err, *needles):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def env_with_path(**extra):
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


# --- item 1: class order as timm's ---------------------------------------------------------------

def natural_folder(root, with_empty=True):
    """class1 (blue), class2 (green), class10 (red): natural order gives the color model's indices
    0, 1, 2; a plain sort puts class10 second. An empty folder sorts first and is not a class."""
    for name, color in (("class1", BLUE), ("class2", GREEN), ("class10", RED)):
        (root / name).mkdir(parents=True)
        for i in range(2):
            write_image(root / name / f"{name}_{i}.png", color)
    if with_empty:
        (root / "Aempty").mkdir()
        (root / "Aempty" / "notes.txt").write_text("no image here")
    return root


def test_item1_class_folders_in_natural_order_and_empty_folders_are_no_class(tmp_path, capsys):
    root = natural_folder(tmp_path / "val")
    color_model(tmp_path / "w.safetensors", 3)
    out_file = tmp_path / "r.json"
    assert color_eval(root, tmp_path / "w.safetensors", "--results-file", str(out_file)) == 0
    row = json.loads(out_file.read_text())
    assert row["top1"] == 100.0 and row["count"] == 6, row
    samples, classes = data.find_images(str(root), on_skip=lambda p, why: None)
    assert classes == ["class1", "class2", "class10"]


def test_item1_natural_key_is_timms():
    names = ["b10", "B2", "a", "a1b2", "a01", "x9y", "10", "9", "", "Z", "z"]
    ref = sorted(names, key=lambda s: ([int(p) if p.isdigit() else p for p in __import__("re").split(r"(\d+)", s.lower())], s))
    assert data.class_order(names) == ref


def test_item1_class_map_txt_and_pkl_give_the_indices(tmp_path, capsys):
    root = natural_folder(tmp_path / "val", with_empty=False)
    color_model(tmp_path / "w.safetensors", 3)
    # a map that reverses the natural order: red folder -> 2 stays, so 1 of 3 classes right
    txt = tmp_path / "map.txt"
    txt.write_text("class10\nclass2\nclass1\n")
    assert color_eval(root, tmp_path / "w.safetensors", "--class-map", str(txt), "--results-file",
                      str(tmp_path / "a.json")) == 0
    assert json.loads((tmp_path / "a.json").read_text())["top1"] == round(100 / 3, 4)
    pkl = tmp_path / "map.pkl"
    pkl.write_bytes(pickle.dumps({"class1": 0, "class2": 1}))  # class10 is not in the map: left out
    assert color_eval(root, tmp_path / "w.safetensors", "--class-map", str(pkl), "--results-file",
                      str(tmp_path / "b.json")) == 0
    row = json.loads((tmp_path / "b.json").read_text())
    assert row["top1"] == 100.0 and row["count"] == 4
    assert "class10: not in the class map" in capsys.readouterr().err


def test_item1_class_map_errors_are_one_line(tmp_path, capsys):
    root = natural_folder(tmp_path / "val", with_empty=False)
    color_model(tmp_path / "w.safetensors", 3)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"class1": os.getcwd}))  # a global: refused, never called
    big = tmp_path / "big.txt"
    big.write_text("\n".join([f"x{i}" for i in range(5)] + ["class1", "class2", "class10"]))  # index 7 for 3 classes
    dup = tmp_path / "dup.txt"
    dup.write_text("class1\nclass2\nclass1\n")
    for path, needle in ((evil, "refers to posix.getcwd"), (big, "index 7 is outside"),
                         (dup, "line 3: 'class1' is given twice (lines 1 and 3)"), (tmp_path / "m.json", "a .txt")):
        if not path.exists():
            path.write_text("{}")
        assert color_eval(root, tmp_path / "w.safetensors", "--class-map", str(path)) == 2
        one_line_error(capsys.readouterr().err, str(path), needle)


def test_item1_flat_folder_with_a_subfolder_stays_flat(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    for i, color in enumerate((BLUE, GREEN, RED)):
        write_image(root / f"img{i}.png", color)
    (root / "labels.txt").write_text("img0.png 0\nimg1.png 1\nimg2.png 2\n")
    (root / "extra").mkdir()
    write_image(root / "extra" / "x.png", RED)
    color_model(tmp_path / "w.safetensors", 3)
    out_file = tmp_path / "r.json"
    assert color_eval(root, tmp_path / "w.safetensors", "--results-file", str(out_file)) == 0
    row = json.loads(out_file.read_text())
    assert row["count"] == 3 and row["top1"] == 100.0, row
    assert "subfolder(s) were not read" in capsys.readouterr().err
    # without a label file: images and subfolders together are an error, not a guess
    (root / "labels.txt").unlink()
    assert color_eval(root, tmp_path / "w.safetensors") == 2
    one_line_error(capsys.readouterr().err, "holds both images and subfolders", "--labels")


@pytest.mark.parametrize("flag,values,needle", [
    ("--mean", ["nan", "nan", "nan"], "finite"), ("--std", ["0", "0", "0"], "> 0"),
    ("--std", ["inf", "1", "1"], "finite"), ("--std", ["-1", "1", "1"], "> 0")])
def test_item1_mean_std_are_validated(tmp_path, capsys, flag, values, needle):
    root = natural_folder(tmp_path / "val", with_empty=False)
    color_model(tmp_path / "w.safetensors", 3)
    out_file = tmp_path / "r.json"
    assert color_eval(root, tmp_path / "w.safetensors", flag, *values, "--results-file", str(out_file)) == 2
    one_line_error(capsys.readouterr().err, flag, needle)
    assert not out_file.exists()


def test_item1_preprocessing_flags_with_digits_are_refused(capsys):
    for extra in (["--mean", "0.1"], ["--std", "0.3"], ["--crop-pct", "0.9"]):
        assert run_eval("--no-progress", *extra) == 2
        one_line_error(capsys.readouterr().err, extra[0], "digits")


def test_item1_data_config_refuses_bad_values():
    from minimixer.checkpoints.preprocessing import DataConfig
    for bad in (dict(mean=(float("nan"),) * 3), dict(std=(0.0,) * 3), dict(crop_pct=0.0), dict(interpolation="cubic")):
        with pytest.raises(ValueError):
            DataConfig(**bad)


# --- item 1: the class-map and label-file parsers, fuzzed -----------------------------------------

def timm_txt_class_map(path):
    """timm.data.readers.class_map.load_class_map's .txt branch, verbatim."""
    with open(path, encoding="utf-8") as f:
        return {v.strip(): k for k, v in enumerate(f)}


NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp", "Zs")), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAME, min_size=1, max_size=12, unique=True), blanks=st.lists(st.booleans(), max_size=12),
       end=st.sampled_from(["\n", "\r\n", "\r"]), last=st.booleans())
def test_item1_fuzz_class_map_txt_as_timm_reads_it(tmp_path, names, blanks, end, last):
    lines = []
    for i, n in enumerate(names):
        if i < len(blanks) and blanks[i]:
            lines.append("  ")
        lines.append(n)
    path = tmp_path / "m.txt"
    path.write_bytes((end.join(lines) + (end if last else "")).encode())
    ref = {k: v for k, v in timm_txt_class_map(path).items() if k}
    assert data.read_class_map(str(path)) == ref


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), ext=st.sampled_from([".txt", ".pkl"]))
def test_item1_fuzz_class_map_bytes_give_a_map_or_one_line(tmp_path, raw, ext):
    path = tmp_path / f"m{ext}"
    path.write_bytes(raw)
    try:
        m = data.read_class_map(str(path))
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert m and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in m.items())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mapping=st.dictionaries(st.one_of(NAME, st.integers(), st.none()),
                               st.one_of(st.integers(-3, 10 ** 6), st.booleans(), st.floats(), NAME), max_size=6))
def test_item1_fuzz_class_map_pickles(tmp_path, mapping):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(mapping))
    valid = bool(mapping) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in mapping.items())
    if valid:
        assert data.read_class_map(str(path)) == mapping
    else:
        with pytest.raises(ValueError, match="m.pkl"):
            data.read_class_map(str(path))


# --- item 1, live: timm's own create_dataset --------------------------------------------------------

def timm_samples(root, class_map=""):
    from timm.data import create_dataset
    ds = create_dataset("", root=str(root), search_split=False, class_map=class_map)
    return ds.reader.samples, ds.reader.class_to_idx


@pytest.mark.timm
def test_item1_live_class_indices_are_timms(tmp_path):
    root = natural_folder(tmp_path / "val")
    for name in ("Class3", "class03b", "n2", "x"):  # case, leading zeros, and an empty folder ("x")
        (root / name).mkdir()
        if name != "x":
            write_image(root / name / "a.jpg", BLUE)
    theirs, _ = timm_samples(root)
    ours, _ = data.find_images(str(root), on_skip=lambda p, why: None)
    assert sorted(ours) == sorted(theirs)
    mapfile = tmp_path / "map.txt"
    mapfile.write_text("n2\n\nclass10\nclass1\n")
    theirs, _ = timm_samples(root, str(mapfile))
    ours, _ = data.find_images(str(root), on_skip=lambda p, why: None, class_map=data.read_class_map(str(mapfile)))
    assert sorted(ours) == sorted(theirs)


@pytest.mark.timm
def test_item1_live_flat_folder_images_are_timms_root_images(tmp_path, monkeypatch):
    """timm gives a folder's own images a class of their own (''), apart from its subfolders':
    eval's flat mode takes exactly those images, never the subfolders' as classes."""
    root = tmp_path / "flat"
    root.mkdir()
    for i, color in enumerate((BLUE, GREEN, RED)):
        write_image(root / f"img{i}.png", color)
    (root / "labels.txt").write_text("img0.png 0\nimg1.png 1\nimg2.png 2\n")
    (root / "extra").mkdir()
    write_image(root / "extra" / "x.png", RED)
    theirs, class_to_idx = timm_samples(root)
    own = sorted(p for p, t in theirs if t == class_to_idx[""])
    seen = {}
    real = meval.ImageLoader

    def spy(samples, *a, **kw):
        seen["paths"] = sorted(p for p, _ in samples)
        return real(samples, *a, **kw)
    monkeypatch.setattr(meval, "ImageLoader", spy)
    color_model(tmp_path / "w.safetensors", 3)
    assert color_eval(root, tmp_path / "w.safetensors") == 0
    assert seen["paths"] == own


# --- item 3: SIGTERM and SIGHUP take Ctrl-C's path ----------------------------------------------------

class Unhandled(Exception):
    pass


@pytest.fixture
def guarded():
    """SIGTERM/SIGHUP raise Unhandled unless the command installs its own handlers, so a command
    that ignores them fails the test instead of killing pytest."""
    def unhandled(signum, frame):
        raise Unhandled(signal.Signals(signum).name)
    previous = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in previous.items():
        signal.signal(s, h)


TINY_TRAIN = ["--embed-dim", "16", "--num-blocks", "2", "--epochs", "2", "--seed", "3", "--no-progress"]


def train_in_process(*args):
    from minimixer.commands import train
    return exit_status(lambda: cli.run(train.main, list(args), prog="python -m minimixer.train"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item3_train_under_sigterm_mid_epoch_resumes_bit_exactly(tmp_path, monkeypatch, capsys, guarded, sig):
    from minimixer.commands import train
    from minimixer.checkpoints.training_state import load_training_state as load_checkpoint
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_in_process("--out", str(straight), *TINY_TRAIN) == 0
    real = train.ArrayLoader

    class SignalAt(real):  # the loader sends the signal during step 30 (epoch 2; 23 steps each)
        def batches(self, epoch=0, start=0):
            for b, batch in enumerate(super().batches(epoch, start), start):
                if self.shuffle and epoch * len(self) + b + 1 == 30:
                    os.kill(os.getpid(), sig)
                yield batch
    monkeypatch.setattr(train, "ArrayLoader", SignalAt)
    capsys.readouterr()
    assert train_in_process("--out", str(stopped), *TINY_TRAIN) == 128 + sig
    err = capsys.readouterr().err
    assert "interrupted after step 30: checkpoint written" in err, err
    state = load_checkpoint(str(stopped / "checkpoint.safetensors"))
    assert state["step"] == 30 and state["partial_epoch"]["seen"] > 0  # mid-epoch
    monkeypatch.setattr(train, "ArrayLoader", real)
    assert train_in_process("--out", str(stopped), "--resume", "--no-progress") == 0
    got, ref = (load_checkpoint(str(d / "checkpoint.safetensors")) for d in (stopped, straight))
    diffs = {k: float(np.abs(got["params"][k] - ref["params"][k]).max()) for k in ref["params"]}
    print("max |params diff|:", max(diffs.values()))
    assert got["step"] == ref["step"] == 46
    assert all(np.array_equal(got["params"][k], ref["params"][k]) for k in ref["params"]), diffs
    for name, st_ in ref["optimizer"]["state"].items():
        for key, v in st_.items():
            assert np.array_equal(got["optimizer"]["state"][name][key], v), f"opt/{name}/{key}"


def test_item3_real_sigterm_from_outside_writes_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "minimixer.train", "--epochs", "200", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with_path())
    deadline = time.time() + 60
    while not (out / "metrics.json").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first epoch is done: training is under way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted after step" in stderr and "checkpoint written" in stderr, stderr
    from minimixer.checkpoints.training_state import load_training_state as load_checkpoint
    assert load_checkpoint(str(out / "checkpoint.safetensors"))["step"] > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item3_eval_under_sigterm_prints_partial_results(tmp_path, monkeypatch, capsys, guarded, sig):
    calls = []
    real = fast.predict  # what evaluate calls

    def predict(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)
    monkeypatch.setattr(fast, "predict", predict)
    out_file = tmp_path / "r.json"
    assert run_eval("--no-progress", "-b", "32", "--results-file", str(out_file)) == 128 + sig
    out, err = capsys.readouterr()
    assert "Acc@1" in out and "interrupted after 64 of 355 images: partial results" in err, (out, err)
    assert json.loads((tmp_path / "r.partial.json").read_text())["count"] == 64


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item3_predict_under_sigterm_keeps_printed_results(tmp_path, monkeypatch, capsys, guarded, sig):
    import importlib
    mpredict = importlib.import_module("minimixer.commands.predict")
    from minimixer.data import load_digits
    from PIL import Image
    images, _ = load_digits()
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"d{i}.png"))
        Image.fromarray((images[i, 0] * 15).astype(np.uint8)).save(paths[-1])
    calls = []
    real = mpredict.predict

    def predict(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)
    monkeypatch.setattr(mpredict, "predict", predict)
    code = exit_status(lambda: cli.run(mpredict.main, [*paths, "-b", "1"], prog="python -m minimixer.predict"))
    out, err = capsys.readouterr()
    assert code == 128 + sig, err
    assert all(p in out for p in paths[:2]) and "interrupted after 2 of 4 images" in err, (out, err)


# --- item 4: --out is checked and locked before the first step ------------------------------------------

def test_item4_second_training_into_the_same_out_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "minimixer.train", "--epochs", "200", "--out", str(out),
                              "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env_with_path())
    try:
        deadline = time.time() + 60
        while not (out / "metrics.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()
        t0 = time.perf_counter()
        assert train_in_process("--out", str(out), "--epochs", "1", "--no-progress") == 2
        seconds = time.perf_counter() - t0
        out_text, err = capsys.readouterr()
        one_line_error(err, f"--out {out}: another training is writing into this folder (process {first.pid})")
        assert "training mixer_digits" not in out_text and seconds < 5, (out_text, seconds)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    # the lock ends with the process: now a training into it works
    assert train_in_process("--out", str(out), "--resume", "--stop-after", str(
        __import__("minimixer.checkpoints.training_state", fromlist=["x"]).load_training_state(str(out / "checkpoint.safetensors"))["step"] + 1),
        "--no-progress") == 0


def unwritable_folder(tmp_path):
    """An existing folder this process cannot write in: chmod 555, or for root (which ignores
    permissions) a folder of a read-only file system such as /proc/self."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (str(ro), "/proc/self", "/sys"):
        try:
            open(os.path.join(folder, ".probe"), "wb").close()
            os.unlink(os.path.join(folder, ".probe"))
        except OSError:
            return folder
    pytest.skip("no unwritable folder here")


def test_item4_unwritable_out_fails_before_the_data_is_read(tmp_path):
    ro = unwritable_folder(tmp_path)
    r = subprocess.run([sys.executable, "-m", "minimixer.train", "--epochs", "1", "--out", ro, "--no-progress"],
                       capture_output=True, text=True, timeout=120, env=env_with_path())
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, f"--out {ro}: cannot write in this folder (")
    assert "training" not in r.stdout and "epoch" not in r.stdout, r.stdout


# --- item 6: no OverflowError, no MemoryError traceback, any bytes in a file name -----------------------

@pytest.mark.parametrize("module,args,needle", [
    ("eval", ["--mlp-ratio", "inf", "4", "--no-progress"], "mlp_ratio must be a finite"),
    ("predict", ["--mlp-ratio", "4", "inf", "x.png"], "mlp_ratio must be a finite"),
    ("summary", ["--mlp-ratio", "inf", "4"], "mlp_ratio must be a finite"),
    ("train", ["--mlp-ratio", "inf", "4", "--no-progress"], "mlp_ratio must be a finite"),
    ("train", ["--warmup", "1e308", "--no-progress"], "--warmup/--warmup-epochs: must be a number of epochs"),
    ("summary", ["--img-size", "100000", "--profile"], "GiB"),
    ("train", ["--embed-dim", "100000", "--no-progress"], "GiB"),
])
def test_item6_overflow_and_memory_errors_are_one_line(tmp_path, module, args, needle):
    r = subprocess.run([sys.executable, "-m", f"minimixer.{module}", *args], capture_output=True, text=True,
                       timeout=120, env=env_with_path(), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, needle)


def test_item6_memory_error_is_one_line(capsys):
    def main(argv):
        np.empty((1 << 30, 1 << 20), np.float64)  # 8 PiB: NumPy's _ArrayMemoryError, on any machine
    assert cli.run(main, [], prog="minimixer x") == 2
    one_line_error(capsys.readouterr().err, "minimixer x: error: out of memory: Unable to allocate")


def test_item6_non_utf8_file_names(tmp_path):
    """Under a UTF-8 locale, a weights file and images whose names are not UTF-8: eval writes its
    results file, predict prints every file (its bytes as \\xNN)."""
    from minimixer.data import load_digits
    from PIL import Image
    d = os.fsencode(tmp_path)
    weights = d + b"/w\xff.safetensors"
    with open(os.path.join(ROOT, "minimixer", "assets", "mixer_digits.safetensors"), "rb") as f:
        open(weights, "wb").write(f.read())
    images, _ = load_digits()
    names = [d + b"/digit\xe9\xff.png", d + b"/ok.png", d + b"/z\x80.png"]
    for i, name in enumerate(names):
        Image.fromarray((images[i, 0] * 15).astype(np.uint8)).save(name.decode("utf-8", "surrogateescape"))
    # a UTF-8 locale such as en_US.UTF-8 gives stdout strict errors (C.UTF-8 gets surrogateescape)
    env = env_with_path(LC_ALL="C.UTF-8", LANG="C.UTF-8", PYTHONIOENCODING="utf-8:strict")
    results = d + b"/r\xff.json"
    r = subprocess.run([sys.executable, "-m", "minimixer.eval", "--weights", weights, "--results-file", results,
                        "--no-progress"], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"w\\xff.safetensors" in r.stdout and json.loads(open(results, "rb").read())["count"] == 355
    r = subprocess.run([sys.executable, "-m", "minimixer.predict", "--weights", weights, *names, "-b", "1"],
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    for shown in (b"digit\\xe9\\xff.png", b"ok.png", b"z\\x80.png"):
        assert shown in r.stdout, r.stdout
    run_dir = d + b"/run\xff"  # train prints its folder's name at every stop
    r = subprocess.run([sys.executable, "-m", "minimixer.train", "--out", run_dir, "--stop-after", "2",
                        "--no-progress"], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and b"run\\" in r.stdout, r.stderr.decode(errors="replace")


# --- item 7: rough edges ----------------------------------------------------------------------------------

def test_item7_out_of_space_names_the_file(tmp_path, monkeypatch):
    from minimixer.checkpoints import safetensors_io as sio

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sio.os, "fsync", full)
    target = tmp_path / "results.json"
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        sio.atomic_write_bytes(str(target), b"{}")
    assert os.listdir(tmp_path) == []


def test_item7_wrong_variant_safetensors_is_named_like_pth(tmp_path):
    from minimixer.checkpoints.convert import load_weights
    path = tmp_path / "s32.safetensors"
    mm.save_weights(mm.init_params(mm.get_config("mixer_s32_224", num_blocks=1)), path)
    with pytest.raises(ValueError) as e:
        load_weights(path, mm.get_config("mixer_b16_224"))
    msg = str(e.value)
    assert "holds a Mixer with 1 blocks, width 512, patch 32" in msg or "holds mixer_s32" in msg, msg
    assert "the model asked for is mixer_b16_224" in msg and len(msg) < 300, msg
    full = tmp_path / "s32full.safetensors"
    mm.save_weights(mm.init_params(mm.get_config("mixer_s32_224")), full)
    with pytest.raises(ValueError, match=r"holds mixer_s32_224 .*; the model asked for is mixer_b16_224"):
        load_weights(full, mm.get_config("mixer_b16_224"))


def test_item7_labels_directory_is_one_line(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    write_image(root / "a.png", BLUE)
    color_model(tmp_path / "w.safetensors", 3)
    assert color_eval(root, tmp_path / "w.safetensors", "--labels", str(tmp_path)) == 2
    line = one_line_error(capsys.readouterr().err, f"--labels {tmp_path} is a directory")
    assert "Errno" not in line
    (tmp_path / "m.txt").mkdir()  # the library says so too, for label files and class maps
    with pytest.raises(ValueError, match="is a directory, not a label file"):
        data.read_label_file(str(tmp_path), ["a.png"])
    with pytest.raises(ValueError, match="is a directory, not a class map"):
        data.read_class_map(str(tmp_path / "m.txt"))


def test_item7_interrupted_eval_keeps_the_complete_results_file(tmp_path, monkeypatch, capsys):
    out_file = tmp_path / "r.csv"
    assert run_eval("--no-progress", "--results-file", str(out_file)) == 0
    complete = out_file.read_bytes()
    real = fast.predict  # what evaluate calls
    calls = []

    def predict(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(fast, "predict", predict)
    assert run_eval("--no-progress", "--results-file", str(out_file)) == 130
    assert out_file.read_bytes() == complete
    partial = (tmp_path / "r.partial.csv").read_text().splitlines()
    assert dict(zip(partial[0].split(","), partial[1].split(",")))["count"] == "32"
    assert f"partial results written to {tmp_path / 'r.partial.csv'}" in capsys.readouterr().err


@pytest.mark.parametrize("ext", [".json", ".csv"])
def test_item7_symlinked_results_file_is_written_through(tmp_path, ext):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / f"results{ext}"
    target.write_text("old")
    link = tmp_path / f"link{ext}"
    link.symlink_to(target)
    assert run_eval("--no-progress", "--results-file", str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "355" in target.read_text()


def test_item1_train_reads_class_folders_as_timm_and_takes_a_class_map(tmp_path, capsys):
    from minimixer.commands import train
    from minimixer.checkpoints.training_state import load_training_state as load_checkpoint
    for split in ("train", "val"):
        natural_folder(tmp_path / "d" / split)
    assert train.folder_samples(str(tmp_path / "d"))[2] == ["class1", "class2", "class10"]
    mapfile = tmp_path / "map.txt"
    mapfile.write_text("class10\nclass2\nclass1\n")
    train_s, _, _ = train.folder_samples(str(tmp_path / "d"), data.read_class_map(str(mapfile)))
    assert {os.path.basename(os.path.dirname(p)): label for p, label in train_s} == \
        {"class10": 0, "class2": 1, "class1": 2}
    args = [*COLOR_ARGS, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "-b", "2", "-j", "1",
            "--epochs", "2", "--no-progress"]
    assert train_in_process(*args, "--class-map", str(mapfile), "--stop-after", "2") == 0
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.safetensors"))
    assert state["data"]["class_map"] == {"class10": 0, "class2": 1, "class1": 2}
    # the resumed run reads the folders with the checkpoint's map (else: 'not the images')
    assert train_in_process("--out", str(tmp_path / "run"), "--resume", "--no-progress") == 0, capsys.readouterr()
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.safetensors"))["step"] == 6
