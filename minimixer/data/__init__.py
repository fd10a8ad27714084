"""Data: the bundled digits, in-memory and image-folder loaders, and timm's transforms.

Plumbing, kept out of the teachable files. Everything here yields NumPy arrays:
images (B, C, H, W) float32, normalized, and labels (B,) int64.

    digits.py      the bundled 8x8 digits and their split
    folders.py     the ImageFolder scan and decoding one image
    loaders.py     batches from arrays or image files
    transforms.py  timm's eval and training transforms
    labels.py      label files for flat folders
"""
from .digits import DIGITS_MEAN, DIGITS_STD, digits_split, load_digits, normalize_digits  # noqa: F401
from .folders import (IMG_EXTENSIONS, check_pixels, class_order, find_images, natural_key,  # noqa: F401
                      open_image, strict_pixel_limit)
from .labels import WNID, read_class_map, read_label_file  # noqa: F401
from .loaders import ArrayLoader, ImageLoader, epoch_order  # noqa: F401
from .transforms import (INTERPOLATIONS, center_crop, eval_transform, resize_shorter,  # noqa: F401
                         to_normalized_array, train_transform)
