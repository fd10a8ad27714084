"""Image folders: the ImageFolder scan (root/<class>/<image>) and decoding one image."""
import os
import re
import sys
import warnings

from PIL import Image, UnidentifiedImageError

from ..checkpoints.safetensors_io import open_regular_file

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _warn_skip(path, reason):
    print(f"skipping {path}: {reason}", file=sys.stderr)


def natural_key(name):
    """timm's sort key for class folders (timm.utils.misc.natural_key): case-folded, digit runs
    compared as numbers, so class2 comes before class10."""
    parts = re.split(r"(\d+)", name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]  # odd pieces are the digit runs


def class_order(names):
    """Class folder names in timm's order: natural_key, then the name itself (timm leaves names
    that differ only in case in set order; here they are ordered, so runs are repeatable)."""
    return sorted(names, key=lambda n: (natural_key(n), n))


def find_images(root, on_skip=None, class_map=None):
    """ImageFolder layout: root/<class>/<image>. Returns (samples [(path, index)], classes).

    Class indices are timm's (ImageDataset, find_images_and_targets): only folders that hold
    an image count as classes, in natural order (class2 before class10), unless class_map
    {folder name: index} (timm's --class-map) gives them; folders it does not name are left out.

    Symbolic links are followed (as torchvision's followlinks), but each real folder is read
    once per class, and never root or a class folder again: `ln -s . a` or `ln -s .. up`
    would loop or count every image many times. A link into another class's folder is left
    out too (its images would get two labels). Only regular files are taken.
    on_skip(path, reason) hears of each folder or file left out (default: a line on stderr).
    """
    on_skip = on_skip or _warn_skip
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data directory not found: {root}")
    folders = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        raise ValueError(f"{root}: no class subfolders (expected ImageFolder layout root/<class>/<image>)")
    class_roots = {os.path.realpath(os.path.join(root, c)): c for c in folders}
    found = {}  # folder name -> its image paths
    for name in class_order(folders):
        top = os.path.join(root, name)
        if class_map is not None and name not in class_map:
            on_skip(top, "not in the class map: its images are left out")
            continue
        others = {r: c for r, c in class_roots.items() if c != name and r != os.path.realpath(top)}
        visited = {os.path.realpath(root), *class_roots}
        unread = []  # a class folder that cannot be read may hold images: it keeps its place

        def told(path, reason):
            if path == top:
                unread.append(path)
            on_skip(path, reason)
        paths = [os.path.join(folder, f) for folder, files in sorted(_walk_once(top, visited, others, told))
                 for f in files]
        if paths or unread:  # a folder without images is no class (timm counts none)
            found[name] = paths
    if not any(found.values()):
        raise ValueError(f"{root}: no images with extensions {', '.join(IMG_EXTENSIONS)}")
    classes = list(found)
    index = class_map if class_map is not None else {name: i for i, name in enumerate(classes)}
    samples = [(path, index[name]) for name in classes for path in found[name]]
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
