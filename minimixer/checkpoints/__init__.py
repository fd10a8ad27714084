"""Checkpoint files and where they come from: the tools around the core, not part of the lesson.

- safetensors_io: timm's safetensors files (strict loading, atomic saving)
- registry: pretrained tags, their numerics and preprocessing, class names, downloads
- convert: one way in for every format (detect, map to timm's names, record numerics)
- pth: torch .pth archives read without torch, and without running their pickle
- mmpretrain, jax: MMPretrain's and Google's original key names, numerics and pipelines
"""
