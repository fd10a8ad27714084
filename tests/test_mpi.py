"""Data parallelism under a real `mpiexec -n 2` (marker mpi: pip install -e '.[test,mpi]').

Each test runs commands under mpiexec and compares with the same command in one process.
This file is also the script the ranks run: `python tests/test_mpi.py steps OUT BATCH`.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the mpich wheel's, in the venv
    return here if os.path.exists(here) else shutil.which("mpiexec")


def run(args, ranks=None, timeout=300, **kw):
    """python ARGS, in one process (ranks None) or under mpiexec -n ranks."""
    options = [a for a in args if a in ("-bind-to", "core")]  # mpiexec's, not python's
    cmd = [sys.executable] + [a for a in args if a not in options]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks)] + options + cmd
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


# --- the script each rank runs: 10 float64 training steps ----------------------------------------

def steps_script(out, batch):
    """10 train_steps on the digits in float64 (AdamW, clipping, drop_path, dropout, label
    smoothing), global batch `batch`; every rank writes its params and losses."""
    from minimixer.runtime import distributed
    from minimixer.config import get_config
    from minimixer.data import ArrayLoader, digits_split
    from minimixer.params import init_params
    from minimixer.training.loop import make_optimizer, train_step
    from minimixer.training.settings import TrainSettings

    cfg = get_config("mixer_digits")
    s = TrainSettings(lr=1e-2, weight_decay=0.05, clip_grad=0.5, drop_path=0.25, dropout=0.2,
                      label_smoothing=0.1, seed=3)
    rng = np.random.default_rng(1)  # perturbed: timm's init zeroes the head, and with it the first step's other grads
    params = {k: v + 0.02 * rng.standard_normal(v.shape) for k, v in init_params(cfg, seed=1, dtype="float64").items()}
    opt = make_optimizer(params, s)
    x, y, _, _ = digits_split()
    loader = ArrayLoader(x.astype(np.float64), y, batch, shuffle=True, seed=s.seed)
    losses = []
    for step, (xb, yb) in zip(range(10), loader.batches(0)):
        losses.append(train_step(params, opt, xb, yb, cfg, lr=s.lr, label_smoothing=s.label_smoothing,
                                 clip_grad=s.clip_grad, drop_path=s.drop_path, dropout=s.dropout,
                                 rng=np.random.default_rng([s.seed, step])))
    np.savez(os.path.join(out, f"rank{distributed.rank()}of{distributed.size()}.npz"),
             losses=np.array(losses), **{f"p/{k}": v for k, v in params.items()})


def load(path):
    z = np.load(path)
    return z["losses"], {k[2:]: z[k] for k in z.files if k.startswith("p/")}


NOISE = "mlp_tokens.fc2.bias"  # zero gradient in exact arithmetic: see compare()


def compare(got, ref):
    """(largest |got - ref| relative to each tensor's scale, largest |got - ref| of the NOISE
    biases relative to the scale of all parameters). The gradient of every mlp_tokens.fc2.bias
    is zero in exact arithmetic (every reader of the residual stream is a LayerNorm), so its
    computed gradient is rounding noise (~1e-17), which AdamW divides by its eps (1e-8): those
    biases move by lr·1e-9 per step in directions set by rounding alone. They are compared
    absolutely, against the other parameters' scale."""
    overall = max(np.abs(v).max() for v in ref.values())
    rel = max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref if NOISE not in k)
    noise = max(float(np.abs(got[k] - ref[k]).max() / overall) for k in ref if NOISE in k)
    return rel, noise


# --- tests ---------------------------------------------------------------------------------

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module", autouse=True)
def needs_mpi():
    pytest.importorskip("mpi4py")
    if mpiexec() is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]')")


# 16 + 16 rows; an uneven 15 + 16; 0 + 1 (a rank with no rows adds zeros); bound to one core each
@pytest.mark.parametrize("batch, bind", [(32, False), (31, False), (1, False), (32, True)])
def test_two_ranks_train_like_one_process(tmp_path, batch, bind):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    r = run([__file__, "steps", str(one), str(batch)])
    assert r.returncode == 0, r.stderr
    r = run(["-bind-to", "core"] * bind + [__file__, "steps", str(two), str(batch)], ranks=2)
    assert r.returncode == 0, r.stderr
    loss1, p1 = load(one / "rank0of1.npz")
    loss_a, pa = load(two / "rank0of2.npz")
    loss_b, pb = load(two / "rank1of2.npz")
    assert all(np.array_equal(pa[k], pb[k]) for k in pa), "the ranks' parameters drifted apart"
    assert np.array_equal(loss_a, loss_b)
    params_rel, noise = compare(pa, p1)
    loss_rel = float(np.abs(loss_a - loss1).max() / np.abs(loss1).max())
    print(f"batch {batch}{' bound to cores' * bind}: params max rel diff {params_rel:.2e} (noise biases "
          f"{noise:.2e}), losses {loss_rel:.2e}; losses {np.round(loss1, 4).tolist()}")
    assert params_rel <= 1e-12 and loss_rel <= 1e-12 and noise <= 1e-9
    assert batch == 1 or loss1[-3:].mean() < loss1[:3].mean() - 0.05  # it did train
    if bind and len(os.sched_getaffinity(0)) == 2:
        # one process splits the batch 16 + 16 over its two cores, exactly as the two ranks do,
        # and 16/32 scales exactly: the same float operations, so the same bits
        assert params_rel == 0.0 and noise == 0.0


# --- sharded evaluation and prediction -------------------------------------------------------

def without_speed(text):
    return re.sub(r"[\d.]+ img/s", "img/s", text)


def image_folder(root, weights):
    """An ImageFolder of 3 classes with noise images (so a random model gets some right, some
    wrong), two unreadable files, and random weights for a 32x32 one-patch model."""
    from PIL import Image
    from minimixer.checkpoints.safetensors_io import save_weights
    from minimixer.config import get_config
    from minimixer.params import init_params

    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "c" / "truncated.png").write_bytes((root / "c" / "c0.png").read_bytes()[:60])
    cfg = get_config("mixer_s32_224", img_size=32, embed_dim=8, num_blocks=1, num_classes=3)
    params = init_params(cfg, seed=0)
    params = {k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in params.items()}
    save_weights(params, weights)
    return ["--model", "mixer_s32_224", "--img-size", "32", "--embed-dim", "8", "--num-blocks", "1",
            "--num-classes", "3", "--weights", str(weights), "--data", str(root)]


@pytest.mark.parametrize("data", ["digits", "folder"])
def test_sharded_eval_prints_what_one_process_prints(tmp_path, data):
    args = ["--batch-size", "4"] if data == "folder" else ["--batch-size", "50", "--limit", "301"]
    if data == "folder":
        args += image_folder(tmp_path / "val", tmp_path / "w.safetensors")
    outputs, rows = [], []
    for ranks in (None, 2):
        for suffix in ("json", "csv"):
            results = tmp_path / f"results{ranks}.{suffix}"
            r = run(["-m", "minimixer.eval", "--no-progress", "--results-file", str(results)] + args, ranks)
            assert r.returncode == 0, r.stderr
            skipped = sorted(line for line in r.stderr.splitlines() if line.startswith("skipping"))
            outputs.append((without_speed(r.stdout), skipped))
            rows.append(results.read_text())
    print(outputs[0][0], "\n".join(outputs[0][1]))
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    if data == "folder":
        assert "skipped 2" in outputs[0][0] and len(outputs[0][1]) == 2
        assert not outputs[0][0].startswith(" * Acc@1 100.000")  # a model that gets some wrong
    one_json, one_csv, two_json, two_csv = rows
    assert {**json.loads(one_json), "img_per_sec": 0} == {**json.loads(two_json), "img_per_sec": 0}
    assert one_csv.rsplit(",", 1)[0] == two_csv.rsplit(",", 1)[0]  # img_per_sec is the last column


def test_sharded_strict_eval_stops_the_whole_job(tmp_path):
    args = image_folder(tmp_path / "val", tmp_path / "w.safetensors")
    r = run(["-m", "minimixer.eval", "--no-progress", "--strict"] + args, ranks=2, timeout=60)
    print(r.stderr)
    assert r.returncode == 2 and "cannot read image" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_sharded_predict_prints_in_input_order(tmp_path, fmt):
    from PIL import Image
    from minimixer.data import load_digits
    images, _ = load_digits()
    files = []
    for i in range(7):
        files.append(str(tmp_path / f"d{i}.png"))
        Image.fromarray((images[i * 3, 0] * 15).astype(np.uint8)).save(files[-1])
    files.insert(4, str(tmp_path / "missing.png"))
    outs = []
    for ranks in (None, 2):
        r = run(["-m", "minimixer.predict", *files, "--batch-size", "2"] + fmt, ranks)
        assert r.returncode == 2 and "missing.png" in r.stderr  # one unreadable file: status 2 from both
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].count("d6.png") == 1


# --- training through the CLI: resume with another number of ranks, and a killed rank ----------

TRAIN = ["-m", "minimixer.train", "--epochs", "1", "--batch-size", "64", "--dtype", "float64", "--drop-path", "0.1",
         "--dropout", "0.1", "--label-smoothing", "0.1", "--lr", "5e-3", "--embed-dim", "32", "--num-blocks", "2",
         "--no-progress"]


def read_params(path):
    from minimixer.checkpoints.safetensors_io import read_safetensors
    return {k: v for k, v in read_safetensors(str(path)).items()}


def test_resume_with_another_number_of_ranks(tmp_path):
    """1442 digits in batches of 64: 23 steps, the last of 34 rows."""
    r = run(TRAIN + ["--out", str(tmp_path / "straight")])
    assert r.returncode == 0, r.stderr
    straight = read_params(tmp_path / "straight" / "model.safetensors")
    for first, then in ((2, None), (None, 2)):
        out = tmp_path / f"{first}-{then}"
        r = run(TRAIN + ["--out", str(out), "--stop-after", "9"], first)
        assert r.returncode == 0 and "stopped after step 9" in r.stdout, r.stderr
        r = run(TRAIN + ["--out", str(out), "--resume"], then)
        assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
        assert r.stdout.count("resuming from") == 1  # rank 0 alone prints
        resumed = read_params(out / "model.safetensors")
        rel, noise = compare(resumed, straight)
        print(f"{first or 1} ranks then {then or 1}: params max rel diff {rel:.2e} (noise biases {noise:.2e})")
        assert rel <= 1e-12 and noise <= 1e-9
        metrics = json.loads((out / "metrics.json").read_text())
        assert len(metrics) == 1 and metrics[0]["step"] == 23


def rank_pids(launcher_pid):
    """{rank: pid} of the python processes that mpiexec `launcher_pid` started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        ours = f"MPIEXEC_PID={launcher_pid}".encode() in env  # set by the test, inherited by the ranks
        if ours and b"minimixer.train" in cmdline and b"python" in cmdline.split(b"\0")[0]:
            rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"PMI_RANK=")), None)
            found[rank] = int(entry)
    return found


def test_a_killed_rank_ends_the_job_and_leaves_the_checkpoint(tmp_path):
    from minimixer.checkpoints.training_state import load_training_state
    out = tmp_path / "run"
    cmd = [mpiexec(), "-n", "2", sys.executable] + TRAIN[:2] + [
        "--epochs", "30", "--batch-size", "16", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, MPIEXEC_PID=str(os.getpid())))
    try:
        ckpt = out / "checkpoint.safetensors"
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline:  # the end of epoch 1
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint after 120 s"
        pids = {}
        while len(pids) < 2 and time.time() < deadline:
            pids = rank_pids(os.getpid())
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(stdout[-500:], stderr[-500:])
    assert proc.returncode != 0
    assert "BAD TERMINATION" in stdout + stderr and "signal 9" in stdout + stderr  # MPICH's Hydra says who died
    state = load_training_state(str(ckpt))  # intact: written atomically, so the kill cannot leave half a file
    assert state["step"] % 91 == 0 and state["step"] >= 91
    r = run(TRAIN[:2] + ["--epochs", "30", "--out", str(out), "--resume", "--stop-after", str(state["step"] + 2),
                         "--no-progress"])
    assert r.returncode == 0 and f"resuming from {ckpt} at step {state['step']}" in r.stdout, r.stderr


def fail_script():
    """Rank 1 fails with an unexpected error while rank 0 waits for it in a collective."""
    from minimixer.runtime import distributed
    if distributed.rank() == 1:
        raise RuntimeError("something unexpected on rank 1")
    distributed.barrier()


def test_an_exception_on_one_rank_ends_the_job():
    start = time.time()
    r = run([__file__, "fail"], ranks=2, timeout=60)
    print(r.stderr)
    assert r.returncode != 0 and time.time() - start < 60
    assert "RuntimeError: something unexpected on rank 1" in r.stderr
    assert "minimixer: rank 1 of 2 failed: ending the whole job" in r.stderr


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps_script(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "fail":
        fail_script()
