"""Training state: a resumable training checkpoint (params, optimizer state, step, settings,
metrics, RNG), as `python -m minimixer.train` writes it. Not model weights: for those see
convert.load_checkpoint / mm.load_checkpoint, which read them in any format.

    save_training_state(path, params, opt, cfg=..., settings=..., step=..., metrics=..., partial_epoch=...)
    state = load_training_state(path)   # a dict: params, optimizer, step, config, settings, metrics, ...

One safetensors file: params/<name> and opt/<name>/<state> tensors, and metadata entries
format, config, settings, step, optimizer, rng, metrics, partial_epoch, model, data and
sha256, the digest of the whole file written with 64 zeros in place of the digest itself.
"""
import hashlib
import json
import os
import re
from dataclasses import asdict, fields

import numpy as np
import safetensors.numpy

from ..backend import to_numpy
from ..config import MixerConfig, param_shapes
from ..training.settings import OPTIMIZERS, OPTIONAL_SETTINGS, TrainSettings
from ..training.transfer import frozen_names
from .safetensors_io import atomic_target, check_state_dict, read_safetensors

CHECKPOINT_FORMAT = "minimixer-checkpoint-2"  # 2: sha256 of the whole file, model name, data fingerprint
OLD_FORMATS = ("minimixer-checkpoint-1",)  # still read: no checksum, no model name or data fingerprint


_UNSIGNED = "0" * 64


def _sha256_field(digest):
    return f'"sha256":"{digest}"'.encode()


def _signed(arrays, meta):
    """(header, body) of a checkpoint file: safetensors with meta and its sha256 (see above). The
    body, all but the few-kB header, is a view: a large checkpoint is not copied to be signed."""
    data = safetensors.numpy.save(arrays, metadata={**meta, "sha256": _UNSIGNED})
    header_end = 8 + int.from_bytes(data[:8], "little")
    head = data[:header_end]
    assert head.count(_sha256_field(_UNSIGNED)) == 1
    digest = hashlib.sha256(data).hexdigest()
    return head.replace(_sha256_field(_UNSIGNED), _sha256_field(digest)), memoryview(data)[header_end:]


def save_training_state(path, params, opt, *, cfg, settings, step, metrics, partial_epoch, model=None, data=None):
    """Params, optimizer state, step, RNG state (seed and step), settings, metrics, the model's
    name and the data's fingerprint, in one safetensors file with a checksum, written atomically."""
    opt_state = opt.state_dict()
    tensors = {f"params/{k}": v for k, v in to_numpy(params).items()}
    for name, state in opt_state["state"].items():
        tensors.update({f"opt/{name}/{k}": v for k, v in to_numpy(state).items()})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(asdict(cfg)),
        "settings": json.dumps(asdict(settings)),
        "step": str(step),
        "optimizer": json.dumps({k: opt_state[k] for k in ("lr", "weight_decay", "step")}),
        "rng": json.dumps({"seed": settings.seed, "step": step}),
        "metrics": json.dumps(metrics),
        "partial_epoch": json.dumps(partial_epoch),
        "model": json.dumps(model),
        "data": json.dumps(data),
    }
    head, body = _signed({k: np.ascontiguousarray(v) for k, v in tensors.items()}, meta)
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def _header_and_metadata(path):
    """The raw header bytes and the metadata dict of a safetensors file already read successfully."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
    meta = json.loads(header).get("__metadata__") or {}
    return header, meta


def _verify_checksum(path, header, meta):
    digest = meta.get("sha256", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or header.count(_sha256_field(digest)) != 1:
        raise ValueError(f"{path}: the checkpoint's checksum entry is missing or damaged")
    h = hashlib.sha256(len(header).to_bytes(8, "little"))
    h.update(header.replace(_sha256_field(digest), _sha256_field(_UNSIGNED), 1))
    with open(path, "rb") as f:
        f.seek(8 + len(header))
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != digest:
        raise ValueError(f"{path}: checksum mismatch: the checkpoint was changed or damaged after it was written")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_training_state(path):
    """Read and check a training checkpoint written by save_training_state.

    Anything that is not a complete, intact checkpoint of a consistent run (a weights file,
    damaged bytes, malformed or mismatched metadata, missing optimizer state, non-finite values)
    raises ValueError with one line that names the path and the problem."""
    path = os.fspath(path)
    tensors = read_safetensors(path)  # ValueError (naming the path) for what is not safetensors at all
    header, meta = _header_and_metadata(path)
    fmt = meta.get("format")
    if fmt not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise ValueError(f"{path}: not a minimixer training checkpoint (no '{CHECKPOINT_FORMAT}' metadata); "
                         "to start from model weights use --init-from")
    if fmt == CHECKPOINT_FORMAT:
        _verify_checksum(path, header, meta)
    state = _parse_metadata(path, meta)
    state["params"], opt_state = _check_tensors(path, tensors, state["config"], state["settings"], state["step"])
    state["optimizer"]["state"] = opt_state
    return state


def _parse_metadata(path, meta):
    """The metadata entries, each checked for its type and fields (ValueError naming path and entry)."""
    def bad(what):
        return ValueError(f"{path}: {what}")

    def entry(key, kind, check=None, default=...):
        if key not in meta:
            if default is not ...:
                return default
            raise bad(f"the metadata has no '{key}' entry")
        try:
            value = json.loads(meta[key])
        except ValueError:
            raise bad(f"metadata '{key}' is not valid JSON") from None
        if not isinstance(value, kind) or (check is not None and not check(value)):
            raise bad(f"metadata '{key}' is malformed: {meta[key][:80]!r}")
        return value

    def dataclass_entry(key, cls):
        value, known = entry(key, dict), {f.name for f in fields(cls)}
        unknown, missing = sorted(set(value) - known), sorted(known - set(value) - set(OPTIONAL_SETTINGS))
        if unknown or missing:
            raise bad(f"metadata '{key}' " + (f"has unknown field(s) {unknown}" if unknown else f"lacks {missing}"))
        try:
            return cls.from_dict(value) if cls is MixerConfig else cls(**value)
        except Exception as e:  # noqa: BLE001 - any malformed value (TypeError, OverflowError...), in one line
            raise bad(f"metadata '{key}': {e}") from None

    cfg, settings = dataclass_entry("config", MixerConfig), dataclass_entry("settings", TrainSettings)
    if not re.fullmatch(r"[0-9]{1,15}", meta.get("step", "")):
        raise bad(f"metadata 'step' is not a step number: {meta.get('step', '(missing)')[:80]!r}")
    step = int(meta["step"])
    optimizer = entry("optimizer", dict, lambda o: set(o) == {"lr", "weight_decay", "step"} and _number(o["lr"])
                      and _number(o["weight_decay"]) and _count(o["step"]) and o["step"] == step)
    metrics = entry("metrics", list, lambda rows: all(
        isinstance(r, dict) and r.get("epoch") == i and all(_number(v) for v in r.values())
        for i, r in enumerate(rows, 1)))
    partial = entry("partial_epoch", dict, lambda p: set(p) == {"loss_sum", "seen", "time"}
                    and _number(p["loss_sum"]) and _count(p["seen"]) and _number(p["time"]))
    return {"config": cfg, "settings": settings, "step": step, "optimizer": optimizer, "metrics": metrics,
            "partial_epoch": partial, "model": entry("model", (str, type(None)), default=None),
            "data": entry("data", (dict, type(None)), lambda d: d is None or isinstance(d.get("source"), str),
                          default=None)}


def _check_tensors(path, tensors, cfg, settings, step):
    """(params, optimizer state): exactly the config's params, every param's optimizer state
    (after step 0), matching shapes and dtypes, all finite. Arrays are copied (writable)."""
    def bad(what):
        return ValueError(f"{path}: {what}")

    stray = [k for k in tensors if not k.startswith(("params/", "opt/"))]
    if stray:
        raise bad(f"unexpected tensor {stray[0]!r}")
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    if cfg.num_blocks > len(params):  # before param_shapes builds a table of 12 names per block
        raise bad(f"its config has {cfg.num_blocks} blocks, but it holds only {len(params)} parameter tensors")
    shapes = param_shapes(cfg)
    check_state_dict({k: v.shape for k, v in params.items()}, shapes, f"{path}: checkpoint")
    dtypes = sorted({str(v.dtype) for v in params.values()})
    if dtypes not in (["float32"], ["float64"]):
        raise bad(f"parameters must all be float32 or all float64, got {dtypes}")
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            name, _, key = k[len("opt/"):].rpartition("/")
            opt_state.setdefault(name, {})[key] = v
    keys = OPTIMIZERS[settings.optimizer]
    try:
        frozen = frozen_names(settings, shapes)  # these have no optimizer state
    except ValueError as e:
        raise bad(f"settings: {e}") from None
    if set(opt_state) - set(params):
        raise bad(f"optimizer state for unknown parameter {sorted(set(opt_state) - set(params))[0]!r}")
    missing = [f"{n}/{k}" for n in shapes if n not in frozen for k in keys if k not in opt_state.get(n, {})]
    if step > 0 and missing:
        raise bad(f"optimizer state is missing for {len(missing)} of {(len(params) - len(frozen)) * len(keys)} entries "
                  f"(first: {missing[0]}); it cannot be resumed exactly")
    for name, state in opt_state.items():
        for key, v in state.items():
            if key not in keys or v.shape != params[name].shape or v.dtype != params[name].dtype:
                raise bad(f"optimizer state opt/{name}/{key} does not fit {settings.optimizer} and "
                          f"the parameter {name} {tuple(params[name].shape)} {params[name].dtype}")
    for name, v in [*params.items(), *((f"opt/{n}/{k}", v) for n, s in opt_state.items() for k, v in s.items())]:
        if not np.isfinite(v).all():
            raise bad(f"tensor {name} holds NaN or infinite values")
    return ({k: v.copy() for k, v in params.items()},
            {n: {k: v.copy() for k, v in s.items()} for n, s in opt_state.items()})
