"""Checkpoint files and where they come from: the tools around the core, not part of the lesson.

- safetensors_io: timm's safetensors files (strict loading, atomic saving)
- registry: pretrained tags, their preprocessing, class names, downloads
"""
