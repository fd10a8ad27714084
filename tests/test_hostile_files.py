"""Hostile or odd checkpoint files (issue 23, item 5): a rejected .pth cannot change how the
next one is read, a .npz is bounded by its declared sizes before anything is decompressed,
and a .pth whose dicts have int or tuple keys is one line, not a traceback.

The pickles are spelled by hand (protocol 2), the way torch.save spells them, so no torch is
needed: see _tensor_pickle.
"""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimixer.checkpoints.convert import read_checkpoint
from minimixer.checkpoints.pth import PthError, read_pth
from minimixer.commands.weights import main as weights_main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_NPZ = os.path.join(FIXTURES, "jax_tiny.npz")


def torch_like_zip(path, payload, extra=None):
    """A zip laid out as torch.save lays it out, with a pickle of our choosing."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def _str(s):
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def _tensor_pickle(numel=3, key="w"):
    """OrderedDict({key: FloatStorage tensor of numel elements}) as torch spells it (the
    OrderedDict() calls are the no-argument calls that a mutated default would change)."""
    return (b"\x80\x02ccollections\nOrderedDict\n)R" + _str(key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str("0") + _str("cpu")
            + b"K" + bytes([numel]) + b"tQK\x00K" + bytes([numel]) + b"\x85K\x01\x85\x89"
            b"ccollections\nOrderedDict\n)RtRs.")


def trusted(tmp_path):
    path = tmp_path / "trusted.pth"
    torch_like_zip(path, _tensor_pickle(), {"archive/data/0": np.array([1, 2, 3], "<f4").tobytes()})
    return path


REFUSE = b"cos\nsystem\n."  # ends every hostile pickle below: the file is rejected after its BUILD


@pytest.mark.parametrize("name,payload", [
    # BUILD on the FloatStorage stand-in: its dtype becomes int32 (same size, other values)
    ("storage-dtype", b"\x80\x02ctorch\nFloatStorage\n}" + _str("dtype") + _str("<i4") + b"sb0" + REFUSE),
    # the same through BUILD's slot state, which setattr()s
    ("storage-slot", b"\x80\x02ctorch\nFloatStorage\nN}" + _str("dtype") + _str("<i4") + b"s\x86b0" + REFUSE),
    # BUILD on the OrderedDict stand-in (a function): its default argument becomes a poisoned list,
    # so every later OrderedDict() starts with an extra entry
    ("function-defaults", b"\x80\x02ccollections\nOrderedDict\nN}" + _str("__defaults__")
     + b"]" + _str("injected") + b"K\x07\x86a\x85s\x86b0" + REFUSE),
], ids=["storage-dtype", "storage-slot", "function-defaults"])
def test_rejected_pth_cannot_change_the_next_load(tmp_path, name, payload):
    """issue 23.5: the stand-ins are fresh for each load, and BUILD on one is refused: a
    rejected file changes nothing that a later, trusted file's load reads."""
    good = trusted(tmp_path)
    before = read_pth(good)
    hostile = tmp_path / f"{name}.pth"
    torch_like_zip(hostile, payload)
    with pytest.raises(PthError) as e:
        read_pth(hostile)
    print(name, "->", e.value)
    after = read_pth(good)
    print("trusted file after the hostile one:", after)
    assert list(after) == ["w"], f"the trusted file now holds {list(after)}"
    assert after["w"].dtype == np.float32 and after["w"].tolist() == [1.0, 2.0, 3.0], after["w"]
    assert list(before) == list(after)


def test_build_on_a_stand_in_is_refused_within_one_load(tmp_path):
    """Inside one file too: a pickle that rebuilds a storage type before using it is refused,
    so it cannot make its own tensors read with another dtype."""
    payload = _tensor_pickle().replace(b"ctorch\nFloatStorage\n", b"ctorch\nFloatStorage\n}" + _str("dtype")
                                       + _str("<i4") + b"sb", 1)
    path = tmp_path / "self.pth"
    torch_like_zip(path, payload, {"archive/data/0": np.array([1, 2, 3], "<f4").tobytes()})
    with pytest.raises(PthError, match="BUILD"):
        read_pth(path)


@pytest.mark.parametrize("key,shown", [(b"K\x07", "7"), (b"K\x01K\x02\x86", r"\(1, 2\)")],
                         ids=["int", "tuple"])
def test_int_or_tuple_keys_are_one_line(tmp_path, capsys, key, shown):
    """issue 23.5: {7: tensor} or {(1, 2): tensor} as the state dict: one line naming the file
    and the key (was an AttributeError traceback)."""
    payload = _tensor_pickle().replace(b")R" + _str("w"), b")R" + key, 1)
    path = tmp_path / "keys.pth"
    torch_like_zip(path, payload, {"archive/data/0": np.array([1, 2, 3], "<f4").tobytes()})
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and str(path) in msg
    import re
    assert re.search(shown, msg), msg
    assert weights_main(["convert", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def _npz_bomb(path, key="stem/kernel", shape=(256 * 1024 * 1024,)):
    """A .npz of about 1 MB whose one entry declares (and inflates to) 1 GiB of float32 zeros."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(64 << 20)
            for _ in range(int(np.prod(shape)) * 4 // len(chunk)):
                f.write(chunk)


@pytest.mark.parametrize("key", ["stem/kernel", "not_a_mixer"], ids=["mixer-key", "other-key"])
def test_npz_bomb_is_refused_before_decompressing(tmp_path, key):
    """issue 23.5: a 1 MB .npz that inflates to 1 GiB is refused from its declared sizes, in a
    child process whose peak memory stays far below the 1 GiB (was: all of it decompressed)."""
    bomb = tmp_path / "bomb.npz"
    _npz_bomb(bomb, key)
    assert os.path.getsize(bomb) < 2 << 20
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory read from /proc/self/status (Linux)")
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so the child would
    # report the (large) pytest process it was forked from
    code = ("import sys\n"
            "from minimixer.checkpoints.convert import read_checkpoint\n"
            "try:\n    read_checkpoint(sys.argv[1])\nexcept ValueError as e:\n    print('ERR', e)\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "print('MAXRSS_KB', hwm)\n")
    r = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert "ERR" in lines and str(bomb) in lines["ERR"], r.stdout
    peak_mb = int(lines["MAXRSS_KB"]) / 1024
    print(f"peak RSS {peak_mb:.0f} MB for a {os.path.getsize(bomb) / 1e6:.1f} MB file declaring 1 GiB")
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB: the archive was decompressed"


def test_npz_whose_entry_lies_about_its_size_is_refused(tmp_path):
    """An entry whose zip size is not what its .npy header declares: refused by name."""
    src = np.load(JAX_NPZ)
    arrays = {k: src[k] for k in src.files}
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in arrays.items():
            buf = _npy_bytes(v)
            if k == "stem/bias":
                buf = buf[:-4]  # one element short of its declared shape
            zf.writestr(k + ".npy", buf)
    with pytest.raises(ValueError, match="stem/bias") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _npy_bytes(a):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    return buf.getvalue()


def test_honest_npz_still_reads_compressed_or_not(tmp_path):
    """The bounds refuse nothing a real checkpoint is: the fixture, stored and deflated."""
    src = np.load(JAX_NPZ)
    arrays = {k: src[k] for k in src.files}
    plain = read_checkpoint(JAX_NPZ).params
    for name, save in (("stored.npz", np.savez), ("deflated.npz", np.savez_compressed)):
        save(tmp_path / name, **arrays)
        got = read_checkpoint(tmp_path / name).params
        assert set(got) == set(plain) and all(np.array_equal(got[k], plain[k]) for k in plain)


# --- fuzzers, kept as tests ------------------------------------------------------------------

_ATOMS = [b"ctorch\nFloatStorage\n", b"ctorch\nHalfStorage\n", b"ccollections\nOrderedDict\n",
          b"ctorch._utils\n_rebuild_tensor_v2\n", b"c__builtin__\nset\n", b"c_codecs\nencode\n",
          b"}", b"]", b")", b"(", b"N", b"\x85", b"\x86", b"b", b"R", b"s", b"u", b"a", b"e", b"t", b"0", b"2",
          _str("dtype"), _str("__defaults__"), _str("name"), _str("<i4"), _str("w"), b"K\x07", b"K\x00",
          b"q\x01", b"h\x01", b"\x81"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=14))
def test_fuzz_opcode_soup_never_leaks_into_the_next_load(tmp_path, atoms):
    """Random sequences of the opcodes a hostile pickle would use on the allowed names (BUILD,
    NEWOBJ, REDUCE, memo): each file reads or fails with one line, and the trusted file read
    after it is always the same."""
    path = tmp_path / "soup.pth"
    torch_like_zip(path, b"\x80\x02" + b"".join(atoms) + b".")
    try:
        read_checkpoint(path)
    except ValueError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    after = read_pth(trusted(tmp_path))
    assert list(after) == ["w"] and after["w"].dtype == np.float32 and after["w"].tolist() == [1, 2, 3]


@pytest.mark.filterwarnings("ignore:Duplicate name")  # two entries of one name: refused too
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["stem/kernel", "stem/bias", "head/kernel", "x"]),
                          st.lists(st.integers(0, 1 << 40), min_size=0, max_size=4),
                          st.sampled_from(["<f4", "<f8", "<f2", "|u1"]),
                          st.integers(0, 64)), min_size=1, max_size=3))
def test_fuzz_npz_declared_shapes(tmp_path, entries):
    """.npz entries whose headers declare any shape (up to 2^40 per axis) over a few bytes:
    refused with one line or read, never a MemoryError or a traceback of another kind."""
    path = tmp_path / "declared.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, shape, dtype, nbytes in entries:
            import io
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                                       "shape": tuple(shape)})
            zf.writestr(key + ".npy", buf.getvalue() + bytes(nbytes))
    try:
        read_checkpoint(path)
    except ValueError as e:
        assert "\n" not in str(e) and str(path) in str(e)



# --- timm's args: an argparse.Namespace, read as data --------------------------------------

_NS = b"cargparse\nNamespace\n)\x81"  # GLOBAL, EMPTY_TUPLE, NEWOBJ: how protocol 2 spells Namespace()


def _ns_file(tmp_path, tail):
    path = tmp_path / "args.pth"
    body = _tensor_pickle()[2:-1]  # the OrderedDict state dict, without PROTO and STOP
    torch_like_zip(path, b"\x80\x02}" + _str("state_dict") + body + b"s" + _str("args") + _NS + tail + b"s.",
                   {"archive/data/0": np.array([1, 2, 3], "<f4").tobytes()})
    return path


def test_namespace_reads_as_inert_data(tmp_path):
    """Torch-free twin of the live test: Namespace(model='x', lr=0.1) reads as a SimpleNamespace."""
    obj = read_pth(_ns_file(tmp_path, b"}(" + _str("model") + _str("x") + _str("lr") + b"G?\xb9\x99\x99\x99\x99\x99\x9a"
                            + b"ub"))
    import types
    assert isinstance(obj["args"], types.SimpleNamespace) and vars(obj["args"]) == {"model": "x", "lr": 0.1}
    assert obj["state_dict"]["w"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("tail,says", [(b"}" + _str("a") + b"K\x01sb}" + _str("b") + b"K\x02sb", "twice"),
                                       (b"K\x07b", "not a dict of names"),
                                       (b"}K\x01K\x02sb", "not a dict of names")],
                         ids=["build-twice", "int-state", "int-field"])
def test_namespace_refuses_odd_builds(tmp_path, tail, says):
    with pytest.raises(PthError, match=says):
        read_pth(_ns_file(tmp_path, tail))
