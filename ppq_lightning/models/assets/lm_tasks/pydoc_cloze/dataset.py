"""The local data of the ``pydoc_cloze`` task: the JSON-lines files beside this file.

lm-eval-harness calls ``load`` (``custom_dataset`` in ``pydoc_cloze.yaml``) with the task's
metadata; the files are found relative to this file, so the task works from any directory.
"""

from pathlib import Path
from typing import Any


def load(**_: Any) -> Any:
    """The ``validation`` and ``test`` splits as a ``datasets.DatasetDict``."""
    import datasets

    here = Path(__file__).parent
    files = {split: str(here / f"{split}.jsonl") for split in ("validation", "test")}
    return datasets.load_dataset("json", data_files=files)
