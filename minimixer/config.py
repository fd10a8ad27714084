"""Model configurations: MixerConfig, the paper's variants, and the parameter table.

Field names follow timm's MlpMixer keyword arguments, so a config reads the same
as `timm.create_model(name, **kwargs)`.
"""
import dataclasses
import math
from dataclasses import dataclass

from .layers import BLOCK_KEYS, GELU_FORMS


def as_pair(v):
    """(v, v) for one value, a tuple for a pair: img_size and mlp_ratio take either, as in timm."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass(frozen=True)
class MixerConfig:
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224  # an int means square, as in timm
    in_chans: int = 3
    patch_size: int = 16
    num_blocks: int = 8
    embed_dim: int = 512
    mlp_ratio: float | tuple[float, float] = (0.5, 4.0)  # (token, channel) hidden / embed_dim
    ln_eps: float = 1e-6
    gelu: str = "erf"  # 'erf' (exact, nn.GELU's default) or 'tanh'

    def __post_init__(self):
        problems = []
        for name in ("num_classes", "in_chans", "patch_size", "num_blocks", "embed_dim"):
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        img = as_pair(self.img_size)
        if len(img) != 2 or not all(is_int(s) and s > 0 for s in img):
            problems.append(f"img_size must be a positive integer or (H, W) pair, got {self.img_size!r}")
        elif is_int(self.patch_size) and self.patch_size > 0 and (img[0] % self.patch_size or img[1] % self.patch_size):
            problems.append(f"img_size {img[0]}x{img[1]} is not divisible by patch_size {self.patch_size}: "
                            "Mixer cuts the image into whole, non-overlapping patches")
        ratio = as_pair(self.mlp_ratio)
        if len(ratio) != 2 or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
                                      and math.isfinite(r) for r in ratio):
            problems.append(f"mlp_ratio must be a finite positive number or (token, channel) pair, "
                            f"got {self.mlp_ratio!r}")
        elif is_int(self.embed_dim) and self.embed_dim > 0 and min(int(r * self.embed_dim) for r in ratio) < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio!r} times embed_dim {self.embed_dim} leaves an empty hidden layer")
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0 and math.isfinite(self.ln_eps)):
            problems.append(f"ln_eps must be a positive number, got {self.ln_eps!r}")
        if self.gelu not in GELU_FORMS:
            problems.append(f"gelu must be one of {GELU_FORMS}, got {self.gelu!r}")
        if problems:
            raise ValueError("invalid MixerConfig: " + "; ".join(problems))

    @property
    def image_hw(self):
        """(H, W) in pixels."""
        return as_pair(self.img_size)

    @property
    def grid_size(self):
        """(H/P, W/P): the patch grid."""
        h, w = as_pair(self.img_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self):
        """N, the number of tokens."""
        gh, gw = self.grid_size
        return gh * gw

    @property
    def token_hidden(self):
        """DS = int(mlp_ratio[0]·embed_dim), as timm computes it."""
        return int(as_pair(self.mlp_ratio)[0] * self.embed_dim)

    @property
    def channel_hidden(self):
        """DC = int(mlp_ratio[1]·embed_dim)."""
        return int(as_pair(self.mlp_ratio)[1] * self.embed_dim)

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, fields):
        """A config from asdict() output or its JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def is_int(v):
    """An int and not a bool (True is an int to Python, but not a size)."""
    return isinstance(v, int) and not isinstance(v, bool)


# The paper's Table 1, under timm's names (timm registers all but H/14), plus one for the digits.
PRESETS = {
    "mixer_s32_224": dict(patch_size=32, num_blocks=8, embed_dim=512),
    "mixer_s16_224": dict(patch_size=16, num_blocks=8, embed_dim=512),
    "mixer_b32_224": dict(patch_size=32, num_blocks=12, embed_dim=768),
    "mixer_b16_224": dict(patch_size=16, num_blocks=12, embed_dim=768),
    "mixer_l32_224": dict(patch_size=32, num_blocks=24, embed_dim=1024),
    "mixer_l16_224": dict(patch_size=16, num_blocks=24, embed_dim=1024),
    "mixer_h14_224": dict(patch_size=14, num_blocks=32, embed_dim=1280),
    # not in the paper: a small Mixer for the bundled 8x8 digits (weights/README.md)
    "mixer_digits": dict(num_classes=10, img_size=8, in_chans=1, patch_size=2, num_blocks=4, embed_dim=64),
}


def get_config(name, **overrides):
    """A preset by timm's name, with any field overridden: get_config('mixer_b16_224', num_classes=10)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MixerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown MixerConfig field(s) {unknown}; fields are {sorted(fields)}")
    return MixerConfig(**{**PRESETS[name], **overrides})


def param_shapes(cfg):
    """Every parameter's timm name and shape, in timm's state_dict order."""
    D, N, C, P = cfg.embed_dim, cfg.num_patches, cfg.in_chans, cfg.patch_size
    DS, DC = cfg.token_hidden, cfg.channel_hidden
    block = dict(zip(BLOCK_KEYS, [
        (D,), (D,), (DS, N), (DS,), (N, DS), (N,),  # norm1, mlp_tokens.fc1, mlp_tokens.fc2
        (D,), (D,), (DC, D), (DC,), (D, DC), (D,),  # norm2, mlp_channels.fc1, mlp_channels.fc2
    ]))
    shapes = {"stem.proj.weight": (D, C, P, P), "stem.proj.bias": (D,)}
    for i in range(cfg.num_blocks):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,),
                   "head.weight": (cfg.num_classes, D), "head.bias": (cfg.num_classes,)})
    return shapes


def param_count(cfg):
    return sum(math.prod(s) for s in param_shapes(cfg).values())
