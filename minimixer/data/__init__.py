"""Data: the bundled digits, in-memory and image-folder loaders, and timm's transforms.

Plumbing, kept out of the teachable files. Everything here yields NumPy arrays:
images (B, C, H, W) float32, normalized, and labels (B,) int64.
"""
import gzip
import math
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..checkpoints.safetensors_io import open_regular_file

# --- the 8x8 digits ------------------------------------------------------------------

DIGITS_MEAN, DIGITS_STD = 0.5, 0.5


def load_digits():
    """The 1,797 8×8 handwritten digits (scikit-learn's copy of the UCI set; see assets/README.md).

    Returns images (1797, 1, 8, 8) uint8 in 0..16 and labels (1797,) int64.
    """
    with resources.files("minimixer").joinpath("assets/digits.csv.gz").open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 1, 8, 8).astype(np.uint8), table[:, 64]


def normalize_digits(images):
    """uint8 0..16 -> float32 with mean/std 0.5, as the Google Mixer checkpoints normalize RGB."""
    return ((images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)


def digits_split():
    """The fixed, stratified split: within each class, every fifth image (the 5th, 10th, ...)
    is a test image: 355 test, 1,442 train.

    Returns (x_train, y_train, x_test, y_test), images normalized to float32.
    """
    images, labels = load_digits()
    test = np.zeros(len(labels), bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[4::5]] = True
    x = normalize_digits(images)
    return x[~test], labels[~test], x[test], labels[test]


# --- loaders -------------------------------------------------------------------------

def epoch_order(n, seed, epoch, shuffle):
    """The sample order of one epoch: a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ArrayLoader:
    """Batches from in-memory arrays x (n, C, H, W) and y (n,)."""

    def __init__(self, x, y, batch_size, *, shuffle=False, seed=0, drop_last=False):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch=0, start=0):
        """Yield (x, y) for `epoch`, beginning at batch number `start`."""
        order = epoch_order(len(self.y), self.seed, epoch, self.shuffle)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]

    def __iter__(self):
        return self.batches()


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _warn_skip(path, reason):
    print(f"skipping {path}: {reason}", file=sys.stderr)


def find_images(root, on_skip=None):
    """ImageFolder layout: root/<class>/<image>. Class index = position in sorted folder names,
    as in torchvision and timm. Returns (samples [(path, index)], classes).

    Symbolic links are followed (as torchvision's followlinks), but each real folder is read
    once per class, and never root or a class folder again: `ln -s . a` or `ln -s .. up`
    would loop or count every image many times. A link into another class's folder is left
    out too (its images would get two labels). Only regular files are taken.
    on_skip(path, reason) hears of each folder or file left out (default: a line on stderr).
    """
    on_skip = on_skip or _warn_skip
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected ImageFolder layout root/<class>/<image>)")
    class_roots = {os.path.realpath(os.path.join(root, c)): c for c in classes}
    samples = []
    for index, name in enumerate(classes):
        top = os.path.join(root, name)
        others = {r: c for r, c in class_roots.items() if c != name and r != os.path.realpath(top)}
        visited = {os.path.realpath(root), *class_roots}
        for folder, files in sorted(_walk_once(top, visited, others, on_skip)):
            samples += [(os.path.join(folder, f), index) for f in files]
    if not samples:
        raise ValueError(f"{root}: no images with extensions {', '.join(IMG_EXTENSIONS)}")
    return samples, classes


def _walk_once(top, visited, others, on_skip):
    """[(folder, sorted image file names)] under top, entering each real folder once.
    visited: real paths not to enter (updated); others: {real path: class} of other classes."""
    found, pending = [], [top]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:  # real folders first, so their own paths win over links
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))
        except OSError as e:
            on_skip(folder, f"cannot read this folder ({e.strerror or e})")
            continue
        files = []
        for e in entries:
            try:
                if e.is_dir():  # follows links
                    real = os.path.realpath(e.path)
                    owner = next((c for r, c in others.items() if real == r or real.startswith(r + os.sep)), None)
                    if owner is not None:
                        on_skip(e.path, f"a link into the folder of class {owner!r}")
                    elif real in visited:
                        on_skip(e.path, f"a link to {real}, a folder already read (or the data folder)")
                    else:
                        visited.add(real)
                        pending.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    if e.is_file():  # a regular file, or a link to one
                        files.append(e.name)
                    else:
                        on_skip(e.path, "a broken link" if not os.path.exists(e.path) else "not a regular file")
            except OSError as err:
                on_skip(e.path, f"cannot read it ({err.strerror or err})")
        found.append((folder, sorted(files)))
    return found


def open_image(path, mode="RGB"):
    """Decode an image as timm does, Image.open(f).convert('RGB'): any mode (L, LA, RGBA, P,
    CMYK, I;16, ...) becomes RGB. One-channel models ask for mode 'L'.

    Only regular files are read, and an image larger than Pillow's MAX_IMAGE_PIXELS is an
    error (Pillow itself only warns up to twice that)."""
    with open_regular_file(path) as f:
        try:
            img = Image.open(f)
        except UnidentifiedImageError:  # Pillow's message names the file object, not the file
            raise UnidentifiedImageError("cannot identify the image format (not an image, or damaged)") from None
        check_pixels(*img.size)
        return img.convert(mode)


def strict_pixel_limit():
    """For commands: Pillow's DecompressionBombWarning becomes an error (the file is then
    skipped or refused by name) instead of a warning line before ours. Process-wide, so a
    library import does not do it."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def check_pixels(w, h, what="the image is"):
    """Raise ValueError if a w×h image is over Pillow's MAX_IMAGE_PIXELS (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise ValueError(f"{what} {w}x{h} = {w * h} pixels, over the limit of {limit} "
                         "(PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)")


class ImageLoader:
    """Batches decoded and transformed by a thread pool (Pillow releases the GIL while it
    decodes and resizes), prefetching ahead so the model never waits on JPEG decoding.

    transform(img, rng) -> (C, H, W) float32; rng is a per-sample Generator for augmentation.
    Unreadable images are skipped (on_error(path, exc) is told) unless strict is set.
    """

    def __init__(self, samples, transform, batch_size, *, shuffle=False, seed=0, workers=4,
                 drop_last=False, strict=False, on_error=None, mode="RGB"):
        self.samples, self.transform, self.mode = samples, transform, mode
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.workers, self.drop_last, self.strict = max(1, workers), drop_last, strict
        self.on_error = on_error

    def __len__(self):
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _load(self, i, epoch):
        path, label = self.samples[i]
        try:
            rng = np.random.default_rng([self.seed, epoch, i])
            decode = getattr(self.transform, "decode", open_image)  # another library's decoder (OpenCV)
            return self.transform(decode(path, self.mode), rng), label
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported by file name
            if self.strict:
                raise ValueError(f"cannot read image {path}: {e}") from None
            if self.on_error:
                self.on_error(path, e)
            return None

    def batches(self, epoch=0, start=0):
        order = epoch_order(len(self.samples), self.seed, epoch, self.shuffle)
        chunks = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(start, len(self))]
        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            ahead = 2  # batches in flight beyond the one being consumed
            for chunk in chunks[:ahead]:
                pending.append([pool.submit(self._load, i, epoch) for i in chunk])
            for b in range(len(chunks)):
                if b + ahead < len(chunks):
                    pending.append([pool.submit(self._load, i, epoch) for i in chunks[b + ahead]])
                items = [f.result() for f in pending.pop(0)]
                items = [it for it in items if it is not None]
                if items:
                    yield np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int64)

    def __iter__(self):
        return self.batches()


# --- transforms ----------------------------------------------------------------------

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX}


def to_normalized_array(img, mean, std):
    """PIL RGB or L -> (C, H, W) float32: /255, then (x - mean)/std, in float32 as torchvision does."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (H, W, C) or (H, W)
    if x.ndim == 2:
        x = x[:, :, None]  # (H, W, 1)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (C, H, W)


def resize_shorter(img, size, interpolation):
    """torchvision Resize(int): shorter side to size, longer side int(size·long/short)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    check_pixels(new_w, new_h, f"resizing {w}x{h} would give")  # a 100000x1 strip: a 25600000x256 image
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop(img, size):
    """torchvision CenterCrop: offsets int(round((H - size)/2)) with Python's round."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_transform(img_size, *, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                   pipeline="timm"):
    """timm's eval transform (transforms_imagenet_eval, crop_mode 'center'):
    resize the shorter side to floor(img_size / crop_pct), center-crop img_size, normalize.
    pipeline 'mmpretrain': the same steps as MMPretrain does them, with OpenCV; that
    transform reads images with its own transform.decode(path, mode)."""
    if pipeline == "mmpretrain":
        from ..checkpoints.mmpretrain import opencv_eval_transform
        return opencv_eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    scale = math.floor(img_size / crop_pct)

    def transform(img, rng=None):
        img = center_crop(resize_shorter(img, scale, interpolation), img_size)
        return to_normalized_array(img, mean, std)

    return transform


def train_transform(img_size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                    interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3):
    """RandomResizedCrop (torchvision's sampling: 10 tries, then a center crop) and a horizontal flip."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(w, h, rng):
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return left, top, left + cw, top + ch
        in_ratio = w / h  # fallback: the largest center crop within the ratio range
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
        return left, top, left + cw, top + ch

    def transform(img, rng):
        img = img.resize((img_size, img_size), INTERPOLATIONS[interpolation], box=crop_box(*img.size, rng))
        if rng.random() < hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_array(img, mean, std)

    return transform


# --- flat folders with a label file (ImageNet val) ---------------------------------------

WNID = re.compile(r"n[0-9]{8}\Z")  # an ImageNet WordNet id, e.g. n01440764
_INDEX = re.compile(r"-?[0-9]{1,18}\Z")


def read_label_file(path, image_files, wnid_index=None):
    """Labels for the images of a flat folder, from one of the common label files:

    - LOC_val_solution.csv (Kaggle): 'ImageId,PredictionString', the wnid is the first token;
    - 'filename label' lines (space, tab or comma separated), label an index or a wnid;
    - one label per line, in sorted filename order (e.g. a wnid per line for ImageNet val).

    A name with an image extension matches that file only; one without (ImageNet's ImageIds)
    matches the file of that stem. A name given twice is an error naming both lines. UTF-8,
    with or without a BOM. Every error is a ValueError that names the file.

    image_files: the folder's image file names. wnid_index: {wnid: class index} for wnid labels.
    Returns a list of class indices, one per image file.
    """
    try:
        with open_regular_file(path) as f:
            raw = f.read()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a leading BOM is not part of the first name
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty label file")

    def to_index(label, n):
        if _INDEX.match(label):
            return int(label)
        if wnid_index is not None and label in wnid_index:
            return wnid_index[label]
        raise ValueError(f"{path}: line {n}: unknown label {label[:40]!r} (expected a class index"
                         + (" or an ImageNet-1k wnid)" if wnid_index is not None else ")"))

    if lines[0][1].replace(" ", "").lower().startswith("imageid,predictionstring"):
        named = []
        for n, line in lines[1:]:
            image_id, _, prediction = line.partition(",")
            if not prediction.split():
                raise ValueError(f"{path}: line {n}: no label in {line[:60]!r}")
            named.append((image_id.strip(), prediction.split()[0], n))
        return _labels_for(image_files, named, path, to_index)
    fields = [(n, line.replace(",", " ").split()) for n, line in lines]
    if all(len(f) == 2 for _, f in fields):
        return _labels_for(image_files, [(name, label, n) for n, (name, label) in fields], path, to_index)
    if all(len(f) == 1 for _, f in fields):
        if len(fields) != len(image_files):
            raise ValueError(f"{path}: {len(fields)} labels (one per line) for {len(image_files)} images")
        return [to_index(f[0], n) for n, f in fields]
    raise ValueError(f"{path}: unrecognized label file: expected LOC_val_solution.csv, "
                     "'filename label' lines, or one label per line")


def _labels_for(image_files, named, path, to_index):
    """named: [(name, label, line number)]. One label per image file, by full name or stem."""
    full, stem = {}, {}
    for name, label, n in named:
        name = os.path.basename(name)
        table = full if name.lower().endswith(IMG_EXTENSIONS) else stem
        if name in table:
            raise ValueError(f"{path}: line {n}: {name[:60]!r} is labelled twice (lines {table[name][1]} and {n})")
        table[name] = (to_index(label, n), n)
    labels, missing = [], []
    for f in image_files:
        by_full, by_stem = full.get(f), stem.get(os.path.splitext(f)[0])
        if by_full and by_stem:
            raise ValueError(f"{path}: {f} is labelled twice (lines {by_stem[1]} and {by_full[1]})")
        hit = by_full or by_stem
        if hit is None:
            missing.append(f)
        else:
            labels.append(hit[0])
    if missing:
        raise ValueError(f"{path}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return labels
