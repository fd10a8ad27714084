"""Checkpoint files and where they come from: the tools around the core, not part of the lesson.

Bottom to top (each module imports only those above it in this list):
- safetensors_io: safetensors files (strict reading, atomic writing), regular files only
- pth, mmpretrain, jax: torch .pth archives read without torch or their pickle; MMPretrain's and
  Google's key names, numerics and (MMPretrain's) OpenCV pipeline
- preprocessing: the named input pipelines (mean, std, crop, interpolation)
- convert: one way in for every format: detect, map to timm's names, load_weights, convert
- download: fetching a file, checked (size, digest, contents) before it enters the cache, with a deadline
- registry: pretrained tags, their numerics and preprocessing, class names, where each file comes from
- resize: a checkpoint for another image size (the paper's Appendix C, or resampling); uses convert
"""
