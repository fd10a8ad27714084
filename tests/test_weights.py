"""Loading and saving safetensors: strictness, clear errors, fp16/bf16, atomic writes."""
import json
import os
import struct

import numpy as np
import pytest

import minimixer as mm
from minimixer.checkpoints import safetensors_io as W

TINY = dict(num_classes=7, img_size=(9, 15), in_chans=2, patch_size=3, num_blocks=2, embed_dim=6)


@pytest.fixture
def cfg():
    return mm.MixerConfig(**TINY)


@pytest.fixture
def params(cfg):
    rng = np.random.default_rng(0)
    return {k: (v + rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in mm.init_params(cfg).items()}


def safetensors_bytes(tensors):
    """A safetensors file built by hand: 8-byte header length, JSON header, raw data.

    tensors: name -> (dtype tag, shape, raw bytes). Written independently of the
    safetensors package so the reader is tested against the format itself.
    """
    header, blobs, offset = {}, [], 0
    for name, (tag, shape, raw) in tensors.items():
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def test_roundtrip(tmp_path, cfg, params):
    path = tmp_path / "m.safetensors"
    mm.save_weights(params, path)
    loaded = mm.load_weights(path, cfg)
    assert list(loaded) == list(mm.param_shapes(cfg))  # timm's order
    for k in params:
        assert loaded[k].dtype == np.float32 and np.array_equal(loaded[k], params[k]), k
        assert loaded[k].flags.writeable  # optimizers update params in place
    loaded64 = mm.load_weights(path, cfg, dtype="float64")
    assert all(v.dtype == np.float64 for v in loaded64.values())
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("tag, dtype", [("F16", np.float16), ("F64", np.float64)])
def test_half_and_double_files_load(tmp_path, cfg, params, tag, dtype):
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(
        {k: (tag, v.shape, v.astype(dtype).tobytes()) for k, v in params.items()}))
    loaded = mm.load_weights(path, cfg)
    for k, v in params.items():
        assert loaded[k].dtype == np.float32
        assert np.array_equal(loaded[k], v.astype(dtype).astype(np.float32)), k


def test_bf16_file_loads(tmp_path, cfg, params):
    # bf16 is float32's top 16 bits: truncate to get exactly representable values
    bits = {k: (v.view(np.uint32) >> 16).astype("<u2") for k, v in params.items()}
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes({k: ("BF16", b.shape, b.tobytes()) for k, b in bits.items()}))
    loaded = mm.load_weights(path, cfg, dtype="float64")
    for k, b in bits.items():
        expected = (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        assert loaded[k].dtype == np.float64 and np.array_equal(loaded[k], expected), k
        assert np.abs(loaded[k] - params[k]).max() <= np.abs(params[k]).max() * 2**-7  # bf16 keeps 8 bits


def test_strict_loading_names_every_problem_at_once(tmp_path, cfg, params):
    bad = dict(params)
    del bad["blocks.1.norm2.bias"]
    del bad["head.weight"]
    bad["blocks.0.mlp_tokens.fc1.weight"] = np.zeros((4, 15), np.float32)  # DS is 3
    bad["pos_embed"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.safetensors"
    mm.save_weights(bad, path)
    with pytest.raises(ValueError) as e:
        mm.load_weights(path, cfg)
    msg = str(e.value)
    print(msg)
    assert str(path) in msg
    assert "missing 2: blocks.1.norm2.bias, head.weight" in msg
    assert "unexpected 1: pos_embed" in msg
    assert "misshapen 1: blocks.0.mlp_tokens.fc1.weight: file (4, 15) vs model (3, 15)" in msg


def test_weights_for_another_config_are_rejected(tmp_path, cfg, params):
    path = tmp_path / "m.safetensors"
    mm.save_weights(params, path)
    with pytest.raises(ValueError, match=r"misshapen 2: head.weight: file \(7, 6\) vs model \(10, 6\)"):
        mm.load_weights(path, cfg.replace(num_classes=10))
    with pytest.raises(ValueError, match="missing 12: blocks.2.norm1.weight"):
        mm.load_weights(path, cfg.replace(num_blocks=3))


def test_missing_file_is_oserror(tmp_path, cfg):
    with pytest.raises(OSError):
        mm.load_weights(tmp_path / "nope.safetensors", cfg)
    with pytest.raises(OSError):
        mm.load_weights(tmp_path, cfg)  # a directory


@pytest.mark.parametrize("content", [
    b"",  # empty
    b"hello, I am not a checkpoint",  # not safetensors
    b"\x00" * 8,  # header of length zero
    struct.pack("<Q", 10**9) + b"{}",  # header longer than the file
    struct.pack("<Q", 8) + b"not json",  # header not JSON
    "truncated",
], ids=["empty", "text", "zero-header", "huge-header", "bad-json", "truncated"])
def test_unreadable_file_is_valueerror_naming_path(tmp_path, cfg, params, content):
    path = tmp_path / "broken.safetensors"
    if content == "truncated":
        mm.save_weights(params, path)
        content = path.read_bytes()[:-100]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file"):
        mm.load_weights(path, cfg)


def test_integer_tensor_is_rejected_by_name(tmp_path, cfg, params):
    tensors = {k: ("F32", v.shape, v.tobytes()) for k, v in params.items()}
    tensors["norm.bias"] = ("I32", (6,), np.arange(6, dtype=np.int32).tobytes())
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(tensors))
    with pytest.raises(ValueError, match="tensor 'norm.bias' has dtype I32"):
        mm.load_weights(path, cfg)


def test_load_rejects_bad_dtype(tmp_path, cfg, params):
    path = tmp_path / "m.safetensors"
    mm.save_weights(params, path)
    with pytest.raises(ValueError, match="unsupported dtype 'bfloat16'"):
        mm.load_weights(path, cfg, dtype="bfloat16")


def test_save_is_atomic(tmp_path, cfg, params, monkeypatch):
    path = tmp_path / "m.safetensors"
    mm.save_weights(params, path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(W.os, "replace", failing_replace)
    changed = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError, match="disk full"):
        mm.save_weights(changed, path)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # and no temp file is left
