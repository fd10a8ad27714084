"""Generated bad input for everything that parses outside data: weight files, label files,
image bytes and folder trees. Each generator stays here as a fast test (bounded examples).

The property everywhere: a clear ValueError/OSError that names the file, or a correct
result; never another exception, a hang, or a silently wrong answer."""
import io
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import minimixer as mm
from minimixer import data
from minimixer.checkpoints.registry import imagenet_classes

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TINY = mm.MixerConfig(num_classes=3, img_size=(4, 6), in_chans=1, patch_size=2, num_blocks=1, embed_dim=4)


def _tiny_file():
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in mm.init_params(TINY).items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        mm.save_weights(params, path)
        return params, open(path, "rb").read()


PARAMS, WEIGHTS = _tiny_file()
HEADER_END = 8 + int.from_bytes(WEIGHTS[:8], "little")


def mutated(base, header_end):
    """Byte flips in the header (the structure), in the data, or anywhere; or a truncation.
    Data flips favour the high byte of a little-endian float32, where 0x7f/0xff
    makes an Inf or NaN about half the time."""
    def flips(position, value):
        return st.lists(st.tuples(position, value), min_size=1, max_size=6)

    header_end = min(header_end, len(base) // 2)
    any_byte = st.integers(0, 255)
    high_byte = st.integers(-(-header_end // 4), (len(base) - 4) // 4).map(lambda i: 4 * i + 3)  # < len(base)
    return st.one_of(st.tuples(flips(high_byte, st.one_of(any_byte, st.sampled_from([0x7F, 0xFF]))), st.none()),
                     st.tuples(flips(st.integers(0, header_end - 1), any_byte), st.none()),
                     st.tuples(flips(st.integers(0, len(base) - 1), any_byte), st.none()),
                     st.tuples(st.just([]), st.integers(0, len(base) - 1)))


def apply(base, mutation):
    flips, cut = mutation
    b = bytearray(base)
    for i, v in flips:
        b[i] = v
    return bytes(b[:cut] if cut is not None else b)


@FAST
@given(mutated(WEIGHTS, HEADER_END))
def test_fuzz_weights_file(mutation):
    content = apply(WEIGHTS, mutation)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        with open(path, "wb") as f:
            f.write(content)
        try:
            params = mm.load_weights(path, TINY)
        except ValueError as e:
            assert str(e).startswith(path), e
            return
    # loaded: then it is a complete, finite, correctly shaped set of weights
    assert {k: v.shape for k, v in params.items()} == mm.param_shapes(TINY)
    assert all(np.isfinite(v).all() for v in params.values())
    if content == WEIGHTS:
        assert all(np.array_equal(params[k], PARAMS[k]) for k in PARAMS)


# --- label files -------------------------------------------------------------------------------

WNIDS = [w for w, _ in imagenet_classes()[:5]]
WNID_INDEX = {w: i for i, (w, _) in enumerate(imagenet_classes())}
FILES = ["a.png", "a.jpg", "b.JPEG", "c.png", "val_00000001.JPEG"]
TOKENS = st.sampled_from(FILES + ["a", "b", "c", "val_00000001", "ImageId,PredictionString", ",", " ", "\t",
                                  "\ufeff", "\r", "-1", "0", "7", "99999999999999999999", "\u00b2", "x y z",
                                  "n99999999"] + WNIDS)


def check_labels(path, files, call):
    try:
        labels = call()
    except ValueError as e:
        assert str(e).startswith(path), e
        return None
    assert len(labels) == len(files) and all(type(v) is int for v in labels)
    return labels


@FAST
@given(st.lists(st.lists(TOKENS, max_size=4).map(" ".join), max_size=8).map("\n".join),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]))
def test_fuzz_label_file_text(text, encoding):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "labels.txt")
        with open(path, "wb") as f:
            f.write(text.encode(encoding))
        check_labels(path, FILES, lambda: data.read_label_file(path, FILES, WNID_INDEX))


@FAST
@given(st.binary(max_size=200))
def test_fuzz_label_file_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "labels.txt")
        with open(path, "wb") as f:
            f.write(raw)
        check_labels(path, FILES, lambda: data.read_label_file(path, FILES))


@FAST
@given(st.data())
def test_fuzz_label_file_round_trip(draw):
    """A valid file in any layout (order, separators, BOM, CRLF, blank lines, full names or
    stems, indices or wnids) gives exactly the labels written."""
    files = draw.draw(st.lists(st.sampled_from(["x", "y", "z", "val_1", "img.v2"]), min_size=1, max_size=4,
                               unique=True).flatmap(lambda stems: st.tuples(*[
                                   st.sampled_from([".png", ".JPEG", ".jpg"]).map(lambda e, s=s: s + e)
                                   for s in stems])))
    files = sorted(files)
    labels = draw.draw(st.lists(st.integers(0, 4), min_size=len(files), max_size=len(files)))
    layout = draw.draw(st.sampled_from(["pairs", "loc", "one_per_line"]))
    as_wnid = draw.draw(st.booleans())
    label_text = [WNIDS[v] if as_wnid else str(v) for v in labels]
    if layout == "one_per_line":
        lines = label_text
    else:
        full = draw.draw(st.lists(st.booleans(), min_size=len(files), max_size=len(files)))
        names = [f if use_full and layout == "pairs" else os.path.splitext(f)[0] for f, use_full in zip(files, full)]
        sep = draw.draw(st.sampled_from([" ", "\t", ",", "  "]))
        lines = ([f"{n},{t} 1 2 3 4" for n, t in zip(names, label_text)] if layout == "loc"
                 else [f"{n}{sep}{t}" for n, t in zip(names, label_text)])
        lines = draw.draw(st.permutations(lines))
        if layout == "loc":
            lines = ["ImageId,PredictionString"] + lines
    text = draw.draw(st.sampled_from(["\n", "\r\n", "\n\n"])).join(lines)
    bom = draw.draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "labels.txt")
        with open(path, "wb") as f:
            f.write(bom + text.encode())
        assert data.read_label_file(path, files, WNID_INDEX) == labels


# --- image bytes --------------------------------------------------------------------------------

def _image_bytes(fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (6, 10, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


IMAGES = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF")}
TRANSFORM = data.eval_transform(8, crop_pct=1.0, interpolation="bilinear")


@FAST
@given(st.sampled_from(sorted(IMAGES)).flatmap(lambda fmt: st.tuples(st.just(fmt), mutated(IMAGES[fmt], 64))))
def test_fuzz_image_bytes(case):
    fmt, mutation = case
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img." + fmt.lower())
        with open(path, "wb") as f:
            f.write(apply(IMAGES[fmt], mutation))
        loader = data.ImageLoader([(path, 1)], TRANSFORM, 1, strict=True, workers=1)
        try:
            x, label = loader._load(0, 0)
        except ValueError as e:
            assert str(e).startswith(f"cannot read image {path}: "), e
            return
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all() and label == 1


# --- folder trees ----------------------------------------------------------------------------------

CLASSES = ["a", "b", "c"]
DIRS = [(), ("a",), ("b",), ("c",), ("a", "s"), ("a", "s", "t"), ("b", "s"), ("c", "u")]


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(DIRS[1:]), st.sampled_from(["1.png", "2.jpg", "3.txt"])), max_size=8),
       st.lists(st.tuples(st.sampled_from(DIRS[1:]), st.sampled_from(DIRS + [("nowhere",)]), st.booleans()),
                max_size=5))
def test_fuzz_folder_tree(files, links):
    """Any tree with links to any of its folders (itself, a parent, the root, another class):
    the scan ends, no image is counted twice, and each class has exactly the images that lie
    in its own folder."""
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "D")
        for parts in DIRS:
            os.makedirs(os.path.join(root, *parts), exist_ok=True)
        for parts, name in files:
            open(os.path.join(root, *parts, name), "wb").close()
        for i, (where, target, relative) in enumerate(links):
            at = os.path.join(root, *where, f"link{i}")
            dest = os.path.join(root, *target)
            os.symlink(os.path.relpath(dest, os.path.dirname(at)) if relative else dest, at)
        skipped = []
        try:
            samples, classes = data.find_images(root, on_skip=lambda p, why: skipped.append((p, why)))
        except ValueError as e:
            assert "no images" in str(e)
            assume(False)
        real = [os.path.realpath(p) for p, _ in samples]
        assert len(real) == len(set(real)), "an image counted twice"
        wants = {c: {os.path.realpath(os.path.join(root, *parts, name)) for parts, name in files
                     if parts[0] == c and not name.endswith(".txt")} for c in CLASSES}
        assert classes == [c for c in CLASSES if wants[c]]  # as timm: only folders with images are classes
        for index, c in enumerate(classes):
            got = {os.path.realpath(p) for p, label in samples if label == index}
            assert got == wants[c], (c, skipped)
