"""Data: the bundled digits, in-memory and image-folder loaders, and timm's transforms.

Plumbing, kept out of the teachable files. Everything here yields NumPy arrays:
images (B, C, H, W) float32, normalized, and labels (B,) int64.
"""
import gzip
import math
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from PIL import Image

# --- the 8x8 digits ------------------------------------------------------------------

DIGITS_MEAN, DIGITS_STD = 0.5, 0.5
DIGITS_CLASSES = [str(i) for i in range(10)]


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


def find_images(root):
    """ImageFolder layout: root/<class>/<image>. Class index = position in sorted folder names,
    as in torchvision and timm. Returns (samples [(path, index)], classes)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected ImageFolder layout root/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise ValueError(f"{root}: no images with extensions {', '.join(IMG_EXTENSIONS)}")
    return samples, classes


def open_image(path, mode="RGB"):
    """Decode an image as timm does, Image.open(f).convert('RGB'): any mode (L, LA, RGBA, P,
    CMYK, I;16, ...) becomes RGB. One-channel models ask for mode 'L'."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert(mode)


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
        from .checkpoints.mmpretrain import opencv_eval_transform
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

def read_label_file(path, image_files, wnid_index=None):
    """Labels for the images of a flat folder, from one of the common label files:

    - LOC_val_solution.csv (Kaggle): 'ImageId,PredictionString', the wnid is the first token;
    - 'filename label' lines (space, tab or comma separated), label an index or a wnid;
    - one label per line, in sorted filename order (e.g. a wnid per line for ImageNet val).

    image_files: the folder's image file names. wnid_index: {wnid: class index} for wnid labels.
    Returns a list of class indices, one per image file.
    """
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty label file")

    def to_index(label, where):
        if label.lstrip("-").isdigit():
            return int(label)
        if wnid_index is not None and label in wnid_index:
            return wnid_index[label]
        raise ValueError(f"{path}: {where}: unknown label {label!r} (expected a class index"
                         + (" or an ImageNet-1k wnid)" if wnid_index is not None else ")"))

    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        by_file = {}
        for n, line in enumerate(lines[1:], 2):
            image_id, _, prediction = line.partition(",")
            if not prediction.split():
                raise ValueError(f"{path}: line {n}: no label in {line!r}")
            by_file[image_id] = to_index(prediction.split()[0], f"line {n}")
        return _labels_for(image_files, by_file, path)
    fields = [line.replace(",", " ").split() for line in lines]
    if all(len(f) == 2 for f in fields):
        by_file = {}
        for n, (name, label) in enumerate(fields, 1):
            by_file[os.path.splitext(os.path.basename(name))[0]] = to_index(label, f"line {n}")
        return _labels_for(image_files, by_file, path)
    if all(len(f) == 1 for f in fields):
        if len(fields) != len(image_files):
            raise ValueError(f"{path}: {len(fields)} labels (one per line) for {len(image_files)} images")
        return [to_index(f[0], f"line {n}") for n, f in enumerate(fields, 1)]
    raise ValueError(f"{path}: unrecognized label file: expected LOC_val_solution.csv, "
                     "'filename label' lines, or one label per line")


def _labels_for(image_files, by_file, path):
    missing = [f for f in image_files if os.path.splitext(f)[0] not in by_file]
    if missing:
        raise ValueError(f"{path}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return [by_file[os.path.splitext(f)[0]] for f in image_files]
