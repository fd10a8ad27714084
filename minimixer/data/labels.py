"""Label files for flat folders of images (ImageNet val and the like)."""
import io
import os
import pickle
import re

from ..checkpoints.safetensors_io import open_regular_file
from .folders import IMG_EXTENSIONS

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
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a label file") from None
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


# --- timm's class map: folder name -> class index ------------------------------------------

CLASS_MAP_LIMIT = 64 << 20  # bytes; ImageNet-21k's 21,843 names take 220 KB


class _NoGlobals(pickle.Unpickler):
    """A class map pickle is a dict of strings and ints; any global (a class, a function) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; a class map holds only names and numbers")


def read_class_map(path):
    """timm's --class-map file as {class folder name: index}: '.txt', one name per line, the
    line's number (from 0) its index; or '.pkl', a pickled dict (no globals allowed, as timm).

    As timm: names are stripped, and a blank line still takes its index. Unlike timm, a leading
    BOM is not part of the first name, and a name given twice is an error naming both lines
    (timm would keep the last). Every error is a ValueError that names the file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".pkl"):
        raise ValueError(f"{path}: a class map is a .txt file (one class name per line) or a .pkl dict, "
                         f"not {ext or 'a file without extension'}")
    try:
        with open_regular_file(path) as f:
            raw = f.read(CLASS_MAP_LIMIT + 1)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a class map") from None
    if len(raw) > CLASS_MAP_LIMIT:
        raise ValueError(f"{path}: over {CLASS_MAP_LIMIT >> 20} MB: not a class map")
    if ext == ".pkl":
        try:
            mapping = _NoGlobals(io.BytesIO(raw)).load()
        except Exception as e:  # noqa: BLE001 - any malformed pickle, in one line
            raise ValueError(f"{path}: not a readable class map pickle ({' '.join(str(e).split())[:200] or type(e).__name__})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"{path}: the pickle holds {type(mapping).__name__}, not a non-empty dict "
                             "{class name: index}")
        for name, index in mapping.items():
            if not isinstance(name, str) or not _is_index(index):
                raise ValueError(f"{path}: entry {str(name)[:60]!r}: {str(index)[:60]!r}: expected a class "
                                 "name (str) and an index (int >= 0)")
        return dict(mapping)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = re.split(r"\r\n|\r|\n", text)  # Python's text-mode line ends, as timm reads it
    if lines and lines[-1] == "":
        lines.pop()  # the end of the last line
    mapping, where = {}, {}
    for k, line in enumerate(lines):
        name = line.strip()
        if not name:
            continue  # timm maps '' to k; no folder has that name
        if name in mapping:
            raise ValueError(f"{path}: line {k + 1}: {name[:60]!r} is given twice (lines {where[name]} and {k + 1})")
        mapping[name], where[name] = k, k + 1
    if not mapping:
        raise ValueError(f"{path}: empty class map")
    return mapping


def _is_index(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
