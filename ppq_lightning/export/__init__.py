"""Exporting compressed models to what runtimes load, and loading them back.

``ppq_lightning.export(model, format, path)`` (this package is callable) writes a folder:

- ``"ppq"``: the native packed format, bit-exact (:func:`load_compressed`);
- ``"compressed-tensors"``: a Hugging Face folder that transformers and vLLM read
  (:func:`load_pretrained` also reads the asymmetric grids transformers' default path cannot);
- ``"gguf"``: a GGUF file for llama.cpp (Q4_0 / Q4_1 / Q8_0 grids);
- ``"peft"``: the base model plus the unmerged LoRA adapters, as peft saves them.

Every folder carries ``export.json``: the format, the file sizes, the measured compression rate
of the model and the rate the files realise.
"""

from __future__ import annotations

import sys
import types

from ppq_lightning.export.api import FORMATS, export, export_lightning_checkpoint
from ppq_lightning.export.compressed_tensors import load_pretrained
from ppq_lightning.export.native import load_compressed

__all__ = ["FORMATS", "export", "export_lightning_checkpoint", "load_compressed", "load_pretrained"]


class _CallableModule(types.ModuleType):
    """Lets ``ppq_lightning.export(model, format, path)`` call :func:`export`."""

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
