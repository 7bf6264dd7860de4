"""The models a run uses: default configs, the cache, and preparing a checkpoint once.

Owns :mod:`~specialize.models.zoo` (which model config a data set uses, the cache folder,
training or fitting a checkpoint on first use under a file lock, the validation split a
checkpoint held out), :mod:`~specialize.models.pretrained` (exit heads fitted on a frozen
pretrained backbone) and :mod:`~specialize.models.runtime` (a model's input transform and
the torch thread setting).

May import: ``backbones``, ``streams`` and ``configkit``; nothing else of ``specialize``.
"""
