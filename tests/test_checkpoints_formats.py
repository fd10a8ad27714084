"""MMPretrain .pth and JAX .npz checkpoints, torch-free: committed fixtures, the converter,
the registry's tags, and a .pth reader that never runs the file.

tests/fixtures/make_checkpoint_fixtures.py saved MMPretrain's and Flax's own models (float64,
random weights) and their logits; minimixer must reproduce them from the files alone.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minimixer as mm
from minimixer.checkpoints import registry
from minimixer.checkpoints.convert import config_for_file, detect_format, load_checkpoint, read_checkpoint
from minimixer.checkpoints.pth import PthError, Refused, read_pth
from minimixer.commands.weights import main as weights_main
from support.helpers import assert_all_close, rel_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MM_PTH = os.path.join(FIXTURES, "mmpretrain_tiny.pth")
JAX_NPZ = os.path.join(FIXTURES, "jax_tiny.npz")


def reference(name):
    ref = np.load(os.path.join(FIXTURES, name))
    return ref["x"], ref["logits"], json.loads(str(ref["config"]))


# --- logits of the source models ------------------------------------------------------------

def test_mmpretrain_pth_reproduces_mmpretrain():
    x, ref, _ = reference("mmpretrain_tiny.npz")
    params, cfg = load_checkpoint(MM_PTH, dtype="float64")
    assert (cfg.num_blocks, cfg.embed_dim, cfg.patch_size, cfg.num_classes) == (2, 16, 8, 7)
    assert (cfg.ln_eps, cfg.gelu) == (1e-5, "erf")
    assert_all_close([("logits", mm.predict(params, x, cfg), ref)], 1e-12)
    # the check can fail: timm's eps instead of MMPretrain's moves the logits far past the tolerance
    off = rel_error(mm.predict(params, x, cfg.replace(ln_eps=1e-6)), ref)
    print(f"with ln_eps 1e-6: rel {off:.2e}")
    assert off > 1e-5


def test_jax_npz_reproduces_flax():
    x, ref, c = reference("jax_tiny_ref.npz")
    like = mm.MixerConfig(img_size=tuple(c["img_size"]), patch_size=4, num_blocks=2, embed_dim=12,
                          mlp_ratio=(5 / 12, 20 / 12))
    params, cfg = load_checkpoint(JAX_NPZ, like, dtype="float64")
    assert (cfg.token_hidden, cfg.channel_hidden, cfg.num_classes, cfg.gelu, cfg.ln_eps) == (5, 20, 6, "tanh", 1e-6)
    assert_all_close([("logits", mm.predict(params, x, cfg), ref)], 1e-12)
    off = rel_error(mm.predict(params, x, cfg.replace(gelu="erf")), ref)
    print(f"with the exact GELU: rel {off:.2e}")
    assert off > 1e-4


@pytest.mark.parametrize("src,ref_name,img_size", [(MM_PTH, "mmpretrain_tiny.npz", None),
                                                   (JAX_NPZ, "jax_tiny_ref.npz", ["16", "24"])],
                         ids=["mmpretrain", "jax"])
def test_converted_file_carries_its_numerics(tmp_path, capsys, src, ref_name, img_size):
    x, ref, _ = reference(ref_name)
    out = tmp_path / "converted.safetensors"
    assert weights_main(["convert", src, "--out", str(out)] + (["--img-size", *img_size] if img_size else [])) == 0
    print(capsys.readouterr().out)
    with safetensors.safe_open(out, "np") as f:
        meta = f.metadata()
    source = "mmpretrain" if src == MM_PTH else "jax"
    assert meta["source"] == source and meta["format"] == "pt"
    assert (float(meta["ln_eps"]), meta["gelu"]) == ((1e-5, "erf") if source == "mmpretrain" else (1e-6, "tanh"))
    assert meta["preprocessing"] == ("mmpretrain" if source == "mmpretrain" else "google")
    # what --weights does: a plain config, then the file's numerics; no flags
    plain = mm.MixerConfig(img_size=(16, 24) if img_size else 32, patch_size=4 if img_size else 8,
                           num_blocks=2, embed_dim=12 if img_size else 16,
                           mlp_ratio=(5 / 12, 20 / 12) if img_size else (0.5, 2.0))
    cfg = config_for_file(str(out), plain)
    assert registry.data_config("mixer_s16_224", str(out)).pipeline == ("mmpretrain" if source == "mmpretrain"
                                                                          else "timm")
    params = mm.load_weights(out, cfg, dtype="float64")
    assert_all_close([("logits", mm.predict(params, x, cfg), ref)], 1e-12)
    # and load_weights warns when the config runs other numerics than the file records
    with pytest.warns(UserWarning, match="moves the logits"):
        mm.load_weights(out, cfg.replace(ln_eps=1e-3))


def test_convert_keeps_timm_files_as_timm(tmp_path):
    src = os.path.join(FIXTURES, "tiny_tanh_f64.safetensors")
    out = tmp_path / "t.safetensors"
    assert weights_main(["convert", src, "--out", str(out), "--img-size", "8", "12",
                         "--ln-eps", "1e-5", "--gelu", "tanh"]) == 0
    ck = read_checkpoint(out)
    assert (ck.source, ck.ln_eps, ck.gelu) == ("timm", 1e-5, "tanh")
    original = read_checkpoint(src)
    assert original.recorded == {}  # timm's own files record nothing: the config decides
    for k, v in original.params.items():
        assert np.array_equal(ck.params[k], v) and ck.params[k].dtype == np.float64


def test_predict_cli_applies_converted_metadata(tmp_path, capsys):
    """--weights FILE alone selects MMPretrain's numerics and pipeline: with OpenCV it runs it;
    without, it says which extra to install."""
    out = tmp_path / "m.safetensors"
    assert weights_main(["convert", MM_PTH, "--out", str(out)]) == 0
    # a subprocess: importing minimixer.commands.predict in this process would shadow mm.predict
    image = os.path.join(os.path.dirname(__file__), "images", "china.jpg")
    args = [sys.executable, "-m", "minimixer.predict", image, "--model", "mixer_s16_224", "--weights", str(out),
            "--img-size", "32", "--patch-size", "8", "--num-blocks", "2", "--embed-dim", "16",
            "--mlp-ratio", "0.5", "2", "--json"]
    run = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        import cv2  # noqa: F401
    except ImportError:
        assert run.returncode == 2 and "pip install 'minimixer[opencv]'" in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    else:
        assert run.returncode == 0, run.stderr
        assert len(json.loads(run.stdout)[0]["topk"]) == 5


def test_wrong_variant_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        mm.load_weights(JAX_NPZ, mm.get_config("mixer_b16_224"))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and JAX_NPZ in msg and "2 blocks, width 12" in msg and "mixer_b16_224" in msg
    out = tmp_path / "x.safetensors"
    assert weights_main(["convert", MM_PTH, "--out", str(out), "--model", "mixer_l16_224"]) == 2
    assert not out.exists()


# --- the registry -----------------------------------------------------------------------------

def test_tags_carry_numerics_preprocessing_and_classes(capsys):
    cfg, data, ck = registry.resolve("mixer_b16_224.mmpretrain")
    assert (cfg.ln_eps, cfg.gelu, data.pipeline, ck.num_classes) == (1e-5, "erf", "mmpretrain", 1000)
    cfg, data, ck = registry.resolve("mixer_l16_224.jax_in21k")
    assert (cfg.ln_eps, cfg.gelu, cfg.num_classes, cfg.num_blocks) == (1e-6, "tanh", 21843, 24)
    assert registry.class_names("mixer_b16_224.jax_in21k_ft_in1k", 1000)[1].startswith("goldfish")
    assert weights_main(["list"]) == 0
    out = capsys.readouterr().out
    for tag in ("mixer_b16_224.mmpretrain", "mixer_l16_224.mmpretrain", "mixer_b16_224.jax_in1k",
                "mixer_b16_224.jax_in21k"):
        assert tag in out


def test_url_tag_downloads_checks_and_converts(tmp_path, monkeypatch, capsys):
    import hashlib
    digest = hashlib.sha256(open(MM_PTH, "rb").read()).hexdigest()[:8]
    good = tmp_path / f"mixer-tiny_3rdparty-{digest}.pth"
    shutil.copy(MM_PTH, good)
    bad = tmp_path / "mixer-tiny_3rdparty-00000000.pth"
    shutil.copy(MM_PTH, bad)
    tag = "mixer_b16_224.mmpretrain"
    for path, ok in ((bad, False), (good, True)):
        entry = registry.CHECKPOINTS[tag].__class__(**{**registry.CHECKPOINTS[tag].__dict__, "url": path.as_uri()})
        monkeypatch.setitem(registry.CHECKPOINTS, tag, entry)
        code = weights_main(["download", tag, "--cache-dir", str(tmp_path / f"cache{ok}")])
        out, err = capsys.readouterr()
        if not ok:
            assert code == 2 and "SHA-256" in err and "weights convert" in err
            assert not os.listdir(tmp_path / "cacheFalse")  # no half file left behind
        else:
            assert code == 0, err
            assert read_checkpoint(out.strip()).source == "mmpretrain"
    # --to converts the original file, checking it is the tag's variant (this tiny one is not B/16)
    code = weights_main(["download", tag, "--cache-dir", str(tmp_path / "cacheTrue"), "--to", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "2 blocks, width 16" in err and len(err.strip().splitlines()) == 1


# --- a .pth never runs -------------------------------------------------------------------------

class Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def torch_like_zip(path, payload, extra=None):
    """A zip laid out as torch.save lays it out, with a pickle of our choosing."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def test_pickle_calling_os_system_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch_like_zip(evil, pickle.dumps({"state_dict": {}, "x": Touch(marker)}, protocol=2))
    assert not marker.exists()
    with pytest.raises(Refused, match=r"evil.pth: refused: its pickle calls (posix|os)\.system"):
        read_pth(evil)
    for cmd in (["convert", str(evil), "--out", str(tmp_path / "o.safetensors")],):
        assert weights_main(cmd) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "system" in err
    with pytest.raises(ValueError):
        mm.load_weights(evil, mm.get_config("mixer_digits"))
    assert not marker.exists()  # the command never ran, by any path
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "getattr"), ("torch", "load"),
                                         ("numpy.core.multiarray", "_reconstruct"), ("subprocess", "Popen")])
def test_any_global_outside_the_allow_list_is_refused(tmp_path, module, name):
    path = tmp_path / "g.pth"
    torch_like_zip(path, b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
    with pytest.raises(Refused, match=f"{module}.{name}"):
        read_pth(path)


def test_bad_files_are_one_line_naming_file_and_problem(tmp_path):
    data = open(MM_PTH, "rb").read()
    cases = {
        "truncated.pth": data[:len(data) // 2],
        "notzip.pth": b"this is not a checkpoint at all",
        "empty.pth": b"",
        "legacy.pth": b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",
        "unknown.bin": bytes(range(256)),
    }
    expected = {"truncated.pth": "truncated", "notzip.pth": "unknown format", "empty.pth": "empty file",
                "legacy.pth": "legacy", "unknown.bin": "unknown format"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as e:
            read_checkpoint(path)
        msg = str(e.value)
        print(msg)
        assert "\n" not in msg and str(path) in msg and expected[name] in msg
    # a storage shorter than its tensors, and a tensor view past its storage's end
    short = tmp_path / "short.pth"
    torch_like_zip(short, _tensor_pickle(numel=4, size=(4,)), {"archive/data/0": b"\0" * 8})
    with pytest.raises(PthError, match="holds 8 bytes"):
        read_pth(short)
    past = tmp_path / "past.pth"
    torch_like_zip(past, _tensor_pickle(numel=2, size=(4,)), {"archive/data/0": b"\0" * 8})
    with pytest.raises(PthError, match=r"a tensor of size \(4,\) has more elements than its storage's 2"):
        read_pth(past)
    beyond = tmp_path / "beyond.pth"  # as many elements as the storage, but an offset past its end
    torch_like_zip(beyond, _tensor_pickle(numel=4, size=(4,)).replace(b"K\x00K\x04", b"K\x02K\x04"),
                   {"archive/data/0": b"\0" * 16})
    with pytest.raises(PthError, match="reaches element 5 of a storage of 4"):
        read_pth(beyond)


def _tensor_pickle(numel, size):
    """A protocol-2 pickle of {'w': tensor} the way torch spells it, built by hand."""
    return (b"\x80\x02}X\x01\x00\x00\x00w"
            b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
            + b"K" + bytes([numel]) + b"tQ"
            + b"K\x00" + b"K" + bytes([size[0]]) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")


def test_hand_built_tensor_pickle_reads():
    """The hand-spelled pickle above is what torch writes: it reads as a tensor."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ok.pth")
        torch_like_zip(path, _tensor_pickle(numel=3, size=(3,)),
                       {"archive/data/0": np.array([1, 2, 3], "<f4").tobytes()})
        assert read_pth(path)["w"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("src", [MM_PTH, JAX_NPZ], ids=["pth", "npz"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 10**9))
def test_fuzz_mutated_files_read_or_fail_with_one_line(tmp_path, src, flips, cut):
    """Byte mutations (and truncations) of the fixtures: a result, or one ValueError line
    naming the file; never another exception. (A longer local run: 3,000 mutations, clean.)"""
    data = bytearray(open(src, "rb").read())
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut % 3 == 0:
        data = data[:cut % len(data)]
    path = tmp_path / ("fuzz" + os.path.splitext(src)[1])
    path.write_bytes(bytes(data))
    try:
        ck = read_checkpoint(path)
    except ValueError as e:  # PthError and every format error are ValueErrors
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert ck.source in ("mmpretrain", "timm", "jax")


def test_format_detection_by_content_not_name(tmp_path):
    renamed = tmp_path / "weights.bin"
    shutil.copy(JAX_NPZ, renamed)
    assert detect_format(renamed) == "npz"
    shutil.copy(MM_PTH, renamed)
    assert detect_format(renamed) == "pth"
    shutil.copy(os.path.join(FIXTURES, "tiny_erf_f64.safetensors"), renamed)
    assert detect_format(renamed) == "safetensors"


def _rezip_with_pickle(src, dst, mutate):
    """A copy of the .pth src whose data.pkl is mutate(data.pkl), with valid CRCs, so the
    mutation reaches the unpickler instead of the zip reader's checksum."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, mutate(data) if info.filename.endswith("data.pkl") else data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**9))
def test_fuzz_mutated_pickle_reads_or_fails_with_one_line(tmp_path, flips, cut):
    """Byte mutations of data.pkl itself: the restricted unpickler returns data or raises one
    ValueError line naming the file. (A longer local run: 5,000 mutations, clean.)"""
    def mutate(data):
        data = bytearray(data)
        for pos, value in flips:
            data[pos % len(data)] = value
        return bytes(data[:cut % len(data)] if cut % 4 == 0 else data)

    path = tmp_path / "fuzz.pth"
    _rezip_with_pickle(MM_PTH, path, mutate)
    try:
        read_checkpoint(path)
    except ValueError as e:
        assert "\n" not in str(e) and str(path) in str(e)
