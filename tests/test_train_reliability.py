"""Training reliability (issue 9): skipped images, resume flags and exactness, divergence,
checkpoint checking (fuzzed), orphaned temporary files, Ctrl-C at start-up, timm's flag spellings."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

import minimixer as mm
from minimixer.commands import cli
from minimixer.commands import train
from minimixer.checkpoints.safetensors_io import read_safetensors
from minimixer.data import ArrayLoader, digits_split
from minimixer.checkpoints.training_state import _header_and_metadata, load_training_state
from minimixer.training.loop import Diverged, Interrupted, fit
from minimixer.training.settings import TrainSettings

PROG = "python -m minimixer.train"
CFG = mm.get_config("mixer_digits", embed_dim=16, num_blocks=2)
SETTINGS = TrainSettings(epochs=2, batch_size=32, lr=3e-3, warmup=0.5, drop_path=0.1, dropout=0.1, seed=3)


def checkpoint_bytes(arrays, meta):
    """A training checkpoint's bytes with these tensors and metadata, signed as the format says: the
    sha256 of the whole file as written with 64 zeros in place of the digest."""
    unsigned = "0" * 64
    data = safetensors.numpy.save(arrays, metadata={**meta, "sha256": unsigned})
    digest = hashlib.sha256(data).hexdigest()
    return data.replace(f'"sha256":"{unsigned}"'.encode(), f'"sha256":"{digest}"'.encode(), 1)


def quiet(_):
    pass


def digits_loaders():
    x_train, y_train, x_test, y_test = digits_split()
    return (ArrayLoader(x_train[:256], y_train[:256], 32, shuffle=True, seed=3),  # 8 steps per epoch
            ArrayLoader(x_test[:64], y_test[:64], 64))


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "minimixer.train", *args], capture_output=True, text=True,
                          timeout=timeout)


def cli_in_process(capsys, *args):
    """(exit status, stdout, stderr) of the train command run in this process."""
    code = cli.run(train.main, list(args), prog=PROG)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# --- item 9: a resumed run equals an uninterrupted one ------------------------------------

class SigintBefore:
    """A loader that sends this process SIGINT just before it hands out the batch of step
    `step` (1-based), so Ctrl-C arrives during that step, as a user's would."""

    def __init__(self, loader, step):
        self.loader, self.step = loader, step

    def __len__(self):
        return len(self.loader)

    def batches(self, epoch=0, start=0):
        for b, batch in enumerate(self.loader.batches(epoch, start), start):
            if epoch * len(self) + b + 1 == self.step:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch


class SigintOnEval:
    """A test loader that sends SIGINT when an evaluation starts (a second Ctrl-C: stop at once)."""

    def __init__(self, loader):
        self.loader = loader

    def batches(self, *a):
        os.kill(os.getpid(), signal.SIGINT)
        yield from self.loader.batches(*a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run: its final checkpoint."""
    out = tmp_path_factory.mktemp("straight")
    train_loader, test_loader = digits_loaders()
    fit(mm.init_params(CFG, seed=3), CFG, SETTINGS, train_loader, test_loader, str(out), progress=False, log=quiet)
    return load_training_state(str(out / "checkpoint.safetensors"))


def assert_same_run(got, ref):
    """Params, optimizer state and every metrics row (but the wall-clock speed) identical."""
    diffs = {k: float(np.abs(got["params"][k] - ref["params"][k]).max()) for k in ref["params"]}
    print("max |params diff|:", max(diffs.values()))
    assert all(np.array_equal(got["params"][k], ref["params"][k]) for k in ref["params"]), diffs
    assert {k: v for k, v in got["optimizer"].items() if k != "state"} == \
           {k: v for k, v in ref["optimizer"].items() if k != "state"}
    for name, state in ref["optimizer"]["state"].items():
        for key, v in state.items():
            assert np.array_equal(got["optimizer"]["state"][name][key], v), f"opt/{name}/{key}"
    assert got["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    speedless = [[{k: v for k, v in row.items() if k != "train_img_per_s"} for row in m["metrics"]] for m in (got, ref)]
    assert speedless[0] == speedless[1]
    assert len(speedless[0]) == 2 and got["step"] == ref["step"] == 16


@pytest.mark.parametrize("stop", ["stop-after 11", "stop-after 8", "stop-after 16", "ctrl-c 8",
                                  "ctrl-c 8, again in eval"])
def test_resume_equals_uninterrupted_run(tmp_path, straight, stop):
    """8 steps per epoch: a stop mid-epoch, on an epoch's last step (the metrics row was lost), on the
    run's last step, by Ctrl-C on an epoch's last step, and with a second Ctrl-C during that evaluation."""
    train_loader, test_loader = digits_loaders()
    out = str(tmp_path / "run")
    how, _, step = stop.partition(" ")
    step = int(step.split(",")[0])
    params = mm.init_params(CFG, seed=3)
    if how == "stop-after":
        fit(params, CFG, SETTINGS, train_loader, test_loader, out, stop_after=step, progress=False, log=quiet)
    else:
        test = SigintOnEval(test_loader) if "again" in stop else test_loader
        with pytest.raises(Interrupted, match="at once" if "again" in stop else f"after step {step}"):
            fit(params, CFG, SETTINGS, SigintBefore(train_loader, step), test, out, progress=False, log=quiet)
    state = load_training_state(os.path.join(out, "checkpoint.safetensors"))
    assert state["step"] == step
    fit(state["params"], CFG, SETTINGS, train_loader, test_loader, out, resume=state, progress=False, log=quiet)
    assert_same_run(load_training_state(os.path.join(out, "checkpoint.safetensors")), straight)
    rows = json.load(open(os.path.join(out, "metrics.json")))
    assert [r["epoch"] for r in rows] == [1, 2]


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """A checkpoint after 3 steps (mid-epoch) of a small digits run."""
    out = tmp_path_factory.mktemp("ckpt")
    train_loader, test_loader = digits_loaders()
    fit(mm.init_params(CFG, seed=3), CFG, SETTINGS, train_loader, test_loader, str(out), stop_after=3,
        progress=False, log=quiet, model="mixer_digits")
    return str(out / "checkpoint.safetensors")


def rewrite(src, dst, *, drop=(), meta_changes=None):
    """Copy a checkpoint, dropping tensors whose name starts with one of `drop` and changing metadata,
    with a valid checksum: what a bug or a hand edit could produce."""
    tensors = {k: v for k, v in read_safetensors(src).items() if not k.startswith(tuple(drop))}
    meta = {k: v for k, v in _header_and_metadata(src)[1].items() if k != "sha256"}
    meta.update(meta_changes or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    with open(dst, "wb") as f:
        f.write(checkpoint_bytes(tensors, meta))
    return str(dst)


def test_missing_optimizer_state_is_refused(tmp_path, checkpoint_file, capsys):
    bad = rewrite(checkpoint_file, tmp_path / "no_opt.safetensors", drop=["opt/"])
    with pytest.raises(ValueError, match=r"optimizer state is missing for 60 of 60 entries \(first: "
                                         r"stem.proj.weight/exp_avg\); it cannot be resumed exactly"):
        load_training_state(bad)
    half = rewrite(checkpoint_file, tmp_path / "half.safetensors", drop=["opt/head.weight/exp_avg_sq"])
    with pytest.raises(ValueError, match=r"missing for 1 of 60 entries \(first: head.weight/exp_avg_sq\)"):
        load_training_state(half)
    code, out, err = cli_in_process(capsys, "--resume", bad, "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "optimizer state is missing" in one_line(err)


# --- item 8: flags on resume ------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.1"], r"--lr 0.1 conflicts with the checkpoint .* which has lr 0.003; a resumed run keeps its "
                      r"settings \(only --epochs, --data with the same images, --out, --backend, --workers, "
                      r"--stop-after and --no-progress may be given\)$"),
    (["--batch-size", "16"], "--batch-size 16 conflicts .* batch_size 32"),
    (["-b", "16"], "-b/--batch-size 16 conflicts"),
    (["--model", "mixer_s32_224"], "--model mixer_s32_224 conflicts .* model mixer_digits"),
    (["--embed-dim", "32"], "--embed-dim 32 conflicts .* embed_dim 16"),
    (["--dtype", "float64"], "--dtype float64 conflicts .* dtype float32"),
    (["--opt", "sgd"], "--optimizer/--opt sgd conflicts .* optimizer adamw"),
    (["--seed", "4"], "--seed 4 conflicts .* seed 3"),
    (["--smoothing", "0.1"], "--label-smoothing/--smoothing 0.1 conflicts"),
    (["--sched", "linear"], "--schedule/--sched linear conflicts"),
    (["--drop", "0.2"], "--dropout/--drop 0.2 conflicts"),
    (["--initial-checkpoint", "w.safetensors"], "--init-from/--initial-checkpoint cannot be combined with --resume"),
    (["--stop-after", "2"], "--stop-after 2: the checkpoint is already at step 3"),
])
def test_resume_refuses_a_conflicting_flag(tmp_path, checkpoint_file, capsys, flags, message):
    code, out, err = cli_in_process(capsys, "--resume", checkpoint_file, "--out", str(tmp_path), "--no-progress",
                                    *flags)
    assert code == 2, out + err
    assert re.search(message, one_line(err)), err


def test_resume_applies_epochs_and_names_the_model(tmp_path, capsys):
    """--epochs may change on resume (and says so); same-valued flags are fine; the model's own
    name is shown, not the default's; finished runs say so."""
    out = str(tmp_path / "run")
    shape = ["--in-chans", "1", "--img-size", "8", "--patch-size", "2", "--embed-dim", "8", "--num-blocks", "1",
             "--num-classes", "10"]
    code, _, err = cli_in_process(capsys, "--model", "mixer_s32_224", *shape, "--epochs", "1", "--batch-size", "256",
                                  "--out", out, "--no-progress")
    assert code == 0, err
    code, stdout, err = cli_in_process(capsys, "--resume", "--out", out, "--no-progress", "--epochs", "2",
                                       "--batch-size", "256", "--model", "mixer_s32_224", "--embed-dim", "8")
    assert code == 0, err
    assert f"resuming from {os.path.join(out, 'checkpoint.safetensors')} at step 6: mixer_s32_224" in stdout
    assert "training mixer_s32_224 (" in stdout and "mixer_digits" not in stdout
    assert "applying --epochs 2 (the checkpoint planned 1): the learning-rate schedule is recomputed" in stdout
    assert [r["epoch"] for r in json.load(open(os.path.join(out, "metrics.json")))] == [1, 2]
    code, stdout, err = cli_in_process(capsys, "--resume", "--out", out, "--no-progress")
    assert code == 0 and "nothing to do: the checkpoint has finished all 2 epochs" in stdout
    code, stdout, err = cli_in_process(capsys, "--resume", "--out", out, "--no-progress", "--epochs", "1")
    assert code == 2 and "--epochs 1: the checkpoint has already trained 2 epochs" in one_line(err)


# --- item 7 (skipped images), item 12 (batch larger than the data), and --data on resume -----------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 3 good training images, 2 unreadable ones; 3 good and 1 unreadable val image."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images") / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3 if split == "train" else 1):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    (root / "train" / "c0" / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = (root / "train" / "c1" / "0.png").read_bytes()
    (root / "train" / "c1" / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "val" / "c2" / "empty.png").write_bytes(b"")
    return root


MODEL = ["--model", "mixer_s32_224", "--img-size", "32", "--embed-dim", "8", "--num-blocks", "1", "--workers", "2"]


def test_unreadable_training_images_are_named_counted_and_left_out_of_the_schedule(tmp_path, folder, capsys):
    out = str(tmp_path / "run")
    code, stdout, err = cli_in_process(capsys, *MODEL, "--data", str(folder), "--epochs", "2", "--batch-size", "2",
                                       "--out", out, "--no-progress")
    assert code == 0, err
    for bad in ("train/c0/broken.jpg", "train/c1/truncated.png", "val/c2/empty.png"):
        assert re.search(rf"skipped unreadable (training|validation) image \S*{bad}: ", err), err
    assert len(err.strip().splitlines()) == 3, err
    assert "9 images (2 unreadable skipped), 4 steps/epoch x 2 epochs" in stdout  # 9 // 2, not 11 // 2
    assert "3 unreadable images skipped (2 train, 1 val), named above" in stdout
    rows = json.load(open(os.path.join(out, "metrics.json")))
    assert [(r["step"], r["train_images"], r["train_skipped"], r["test_images"], r["test_skipped"]) for r in rows] \
        == [(4, 8, 2, 3, 1), (8, 8, 2, 3, 1)]
    assert open(os.path.join(out, "metrics.csv")).readline().strip().endswith(
        "train_images,test_images,train_skipped,test_skipped")
    # --data on resume: the checkpoint remembers its folder, and refuses other images
    code, stdout, err = cli_in_process(capsys, "--resume", "--out", out, "--epochs", "3", "--no-progress", "-j", "2")
    assert code == 0 and "resuming from" in stdout, err
    other = tmp_path / "other"
    for split in ("train", "val"):
        for c in range(3):
            (other / split / f"c{c}").mkdir(parents=True)
            for f in (folder / split / f"c{c}").iterdir():
                if f.name != "2.png":
                    (other / split / f"c{c}" / f.name).write_bytes(f.read_bytes())
    code, stdout, err = cli_in_process(capsys, "--resume", "--out", out, "--epochs", "4", "--data", str(other),
                                       "--no-progress")
    assert code == 2
    assert re.search(r"--data \S+: these are not the images the checkpoint was trained on "
                     r"\(6 train / 3 val usable now, 9 / 3 then\)", err.strip().splitlines()[-1]), err


def test_batch_size_larger_than_the_training_set(tmp_path, folder, capsys):
    code, stdout, err = cli_in_process(capsys, *MODEL, "--data", str(folder), "--batch-size", "64",
                                       "--out", str(tmp_path), "--no-progress")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"{PROG}: error: --batch-size 64 is larger than the 9 usable training images in "
        f"{folder / 'train'}; use --batch-size 9 or less")


# --- item 10: divergence ---------------------------------------------------------------------

def test_diverging_cli_run_is_one_line(tmp_path):
    out = tmp_path / "run"
    r = run_cli("--lr", "1e30", "--clip-grad", "0", "--epochs", "1", "--out", str(out), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(rf"{PROG}: error: the loss became nan at step \d+ \(epoch 1\); no checkpoint was written "
                        r"yet; lower --lr or set --clip-grad\n", r.stderr), r.stderr
    assert not (out / "checkpoint.safetensors").exists()


class NanAt:
    """A loader whose batch for step `step` (1-based) holds a NaN pixel."""

    def __init__(self, loader, step):
        self.loader, self.step = loader, step

    def __len__(self):
        return len(self.loader)

    def batches(self, epoch=0, start=0):
        for b, (x, y) in enumerate(self.loader.batches(epoch, start), start):
            if epoch * len(self) + b + 1 == self.step:
                x = x.copy()
                x[0, 0, 0, 0] = np.nan
            yield x, y


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    train_loader, test_loader = digits_loaders()
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"the loss became nan at step 11 \(epoch 2\); the checkpoint of step 8 is kept"):
        fit(mm.init_params(CFG, seed=3), CFG, SETTINGS, NanAt(train_loader, 11), test_loader, str(out),
            progress=False, log=quiet)
    state = load_training_state(str(out / "checkpoint.safetensors"))
    assert state["step"] == 8 and len(state["metrics"]) == 1
    assert all(np.isfinite(v).all() for v in state["params"].values())


# --- item 11: checkpoint checks, fuzzed ----------------------------------------------------------

def assert_one_line_error(path, call):
    try:
        call()
    except ValueError as e:
        msg = str(e)
        assert msg.startswith(path) and "\n" not in msg, msg
        return msg
    return None


@pytest.mark.parametrize("changes, drop, message", [
    ({"config": json.dumps({**json.loads(json.dumps(mm.MixerConfig().__dict__)), "depth": 3})}, (),
     r"metadata 'config' has unknown field\(s\) \['depth'\]"),
    ({"config": "[1, 2]"}, (), "metadata 'config' is malformed: '\\[1, 2\\]'"),
    ({"metrics": '"many"'}, (), "metadata 'metrics' is malformed"),
    ({"optimizer": None}, (), "the metadata has no 'optimizer' entry"),
    ({"settings": '{"epochs": 2}'}, (), "metadata 'settings' lacks"),
    ({"step": "three"}, (), "metadata 'step' is not a step number: 'three'"),
    ({"partial_epoch": "{"}, (), "metadata 'partial_epoch' is not valid JSON"),
    ({}, ["params/blocks.1.norm1.weight"], "checkpoint does not fit this model config: missing 1: blocks.1.norm1"),
    ({"format": "minimixer-checkpoint-1"}, ["opt/"], "optimizer state is missing"),
])
def test_malformed_or_mismatched_checkpoint_is_one_line(tmp_path, checkpoint_file, changes, drop, message):
    bad = rewrite(checkpoint_file, tmp_path / "bad.safetensors", drop=drop, meta_changes=changes)
    msg = assert_one_line_error(bad, lambda: load_training_state(bad))
    assert msg is not None and re.search(message, msg), msg


def test_checksum_catches_a_flipped_byte_and_nan_is_refused(tmp_path, checkpoint_file):
    data = bytearray(open(checkpoint_file, "rb").read())
    data[-3] ^= 0x01  # the last tensor's data: a valid file, silently wrong without a checksum
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    assert re.search("checksum mismatch", assert_one_line_error(str(flipped), lambda: load_training_state(str(flipped))))
    tensors = read_safetensors(checkpoint_file)
    meta = {k: v for k, v in _header_and_metadata(checkpoint_file)[1].items() if k != "sha256"}
    tensors = {k: (np.full_like(v, np.nan) if k == "params/head.bias" else v) for k, v in tensors.items()}
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(checkpoint_bytes(tensors, meta))
    message = assert_one_line_error(str(nan), lambda: load_training_state(str(nan)))
    assert "tensor head.bias holds NaN or infinite values" in message


FUZZ = hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.data())
def test_fuzz_byte_flips_are_always_caught(tmp_path, checkpoint_file, data):
    original = open(checkpoint_file, "rb").read()
    i = data.draw(st.integers(0, len(original) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(original)
    mutated[i] ^= mask
    path = str(tmp_path / "mutated.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(mutated))
    assert assert_one_line_error(path, lambda: load_training_state(path)) is not None, f"byte {i} ^ {mask} not caught"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**16) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
ENTRIES = ["config", "settings", "step", "optimizer", "metrics", "partial_epoch", "model", "data", "format"]


@FUZZ
@given(st.data())
def test_fuzz_metadata_gives_a_checkpoint_or_one_line(tmp_path, checkpoint_file, data):
    """Any metadata entry replaced (text, JSON of any shape, one field of a dict changed, added or
    removed), with a valid checksum: load_training_state returns or raises one ValueError line."""
    meta = {k: v for k, v in _header_and_metadata(checkpoint_file)[1].items() if k != "sha256"}
    key = data.draw(st.sampled_from(ENTRIES), label="entry")
    how = data.draw(st.sampled_from(["text", "json", "field", "delete"]), label="how")
    if how == "text":
        meta[key] = data.draw(st.text(max_size=20), label="text")
    elif how == "json":
        meta[key] = json.dumps(data.draw(JSON, label="value"))
    elif how == "delete":
        del meta[key]
    else:
        value = json.loads(meta[key]) if key not in ("step", "format") else {}
        if isinstance(value, dict) and value:
            field = data.draw(st.sampled_from(sorted(value) + ["unknown"]), label="field")
            value[field] = data.draw(JSON, label="field value")
        elif isinstance(value, list) and value:
            value[0] = data.draw(JSON, label="row")
        meta[key] = json.dumps(value)
    tensors = read_safetensors(checkpoint_file)
    path = str(tmp_path / "meta.safetensors")
    with open(path, "wb") as f:
        f.write(checkpoint_bytes(tensors, meta))
    assert_one_line_error(path, lambda: load_training_state(path))


@FUZZ
@given(st.data())
def test_fuzz_tensor_changes_are_refused(tmp_path, checkpoint_file, data):
    """A tensor dropped, cast to another dtype or reshaped (checksum valid): always one ValueError line."""
    tensors = read_safetensors(checkpoint_file)
    meta = {k: v for k, v in _header_and_metadata(checkpoint_file)[1].items() if k != "sha256"}
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    how = data.draw(st.sampled_from(["drop", "float16", "float64", "reshape"]), label="how")
    if how == "drop":
        del tensors[name]
    elif how == "reshape":
        tensors[name] = np.concatenate([tensors[name].ravel(), [0]]).astype(tensors[name].dtype)
    else:
        tensors[name] = tensors[name].astype(how)
    path = str(tmp_path / "tensors.safetensors")
    with open(path, "wb") as f:
        f.write(checkpoint_bytes(tensors, meta))
    assert assert_one_line_error(path, lambda: load_training_state(path)) is not None, f"{how} {name} accepted"


# --- item 20: orphaned temporary files ---------------------------------------------------------------

def test_orphaned_temporary_files_are_removed_on_the_next_start(tmp_path, checkpoint_file):
    out = tmp_path / "run"
    out.mkdir()
    state = load_training_state(checkpoint_file)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer that was killed: its process no longer runs
    orphans = [f".tmp-{gone.pid}-k3j2h1x9checkpoint.safetensors", f".tmp-{gone.pid}-0a9b8c7dmetrics.json",
               ".tmp-zzzzzz_zmodel.safetensors"]  # no pid (older versions): by age
    kept = [".tmp-notes.txt",  # another program's file
            f".tmp-{os.getppid()}-abcd1234metrics.csv"]  # its writer still runs
    old = time.time() - 3600
    for name in orphans + kept:
        (out / name).write_bytes(b"half a file")
        os.utime(out / name, (old, old))
    lines = []
    train_loader, test_loader = digits_loaders()
    fit(state["params"], CFG, SETTINGS, train_loader, test_loader, str(out), resume=state, stop_after=4,
        progress=False, log=lines.append)
    assert sorted(os.listdir(out)) == sorted(kept + ["checkpoint.safetensors"])
    assert lines[0] == (f"removed 3 temporary file(s) left in {out} by an interrupted write: "
                        + ", ".join(sorted(orphans)))


def test_kill_9_during_a_checkpoint_write_leaves_an_orphan_that_the_next_start_removes(tmp_path, capsys):
    out = tmp_path / "run"
    code = f"""
import os, signal, sys
from minimixer.commands import cli
from minimixer.commands import train
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die after the data, before the rename
sys.exit(cli.run(train.main, ["--stop-after", "1", "--out", {str(out)!r}, "--no-progress"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    orphans = [f for f in os.listdir(out) if f.startswith(".tmp-")]
    assert len(orphans) == 1 and orphans[0].endswith("checkpoint.safetensors"), os.listdir(out)
    status, stdout, err = cli_in_process(capsys, "--stop-after", "1", "--out", str(out), "--no-progress")
    assert status == 0, err
    assert f"removed 1 temporary file(s) left in {out} by an interrupted write: {orphans[0]}" in stdout
    assert os.listdir(out) == ["checkpoint.safetensors"]


# --- item 13: Ctrl-C during start-up ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["find_images", "open_image"])
def test_ctrl_c_during_start_up_is_one_line_exit_130(tmp_path, folder, where):
    """A real SIGINT while the folder is scanned (find_images) or its images are checked (open_image)."""
    code = f"""
import os, signal, sys
from minimixer.commands import cli
from minimixer.commands import train
real = getattr(train, {where!r})
def interrupted(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)
    return real(*a, **k)
setattr(train, {where!r}, interrupted)
sys.exit(cli.run(train.main, {[*MODEL, "--data", str(folder), "--out", str(tmp_path / "run"), "--no-progress"]!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stderr == f"{PROG}: interrupted before training started; nothing was written\n"
    assert not (tmp_path / "run").exists()


# --- item 22: timm's spellings ----------------------------------------------------------------------

@pytest.mark.parametrize("alias, flag, value", [
    ("--output", "--out", "runs/x"), ("--initial-checkpoint", "--init-from", "w.safetensors"),
    ("--smoothing", "--label-smoothing", "0.1"), ("--warmup-epochs", "--warmup", "2"), ("--opt", "--optimizer", "sgd"),
    ("--sched", "--schedule", "linear"), ("--drop", "--dropout", "0.2"), ("-b", "--batch-size", "16"),
    ("-j", "--workers", "2"),
])
def test_timm_spellings_are_one_definition(alias, flag, value):
    """The alias parses to exactly what the flag does, is checked by the same rule, and is listed with it."""
    parser, spellings = train.build_parser()
    assert vars(parser.parse_args([alias, value])) == vars(parser.parse_args([flag, value])) \
        != vars(parser.parse_args([]))
    assert {flag, alias} in [set(s.split("/")) for s in spellings.values()]
    if flag not in ("--out", "--init-from", "--optimizer", "--schedule"):
        for spelling in (alias, flag):
            with pytest.raises(SystemExit):
                parser.parse_args([spelling, "-5"])
