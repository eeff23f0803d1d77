"""Text corpora tokenised into fixed-length windows, with a calibration split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int, check_number
from ppq_lightning.models.loading import OFFLINE_DEFAULT, load_tokenizer

SOURCES = ("pydoc", "files", "wikitext2", "c4")
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


class _Windows(Dataset):
    """Rows of a ``(n, seqlen)`` tensor as ``{"input_ids": ...}`` samples."""

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.windows[index]}


def pydoc_text() -> str:
    """CPython's own English documentation topics (``pydoc_data.topics``): offline text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _load_dataset(source: str, *args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise PPQConfigError(
            f"source={source!r} needs the `datasets` package "
            "(`pip install datasets`) and network access; the sources "
            "'pydoc' and 'files' work offline."
        ) from err
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types when the hub is unreachable
        reason = str(err).splitlines()[0] if str(err) else ""
        raise PPQConfigError(
            f"source={source!r} could not be loaded ({type(err).__name__}: {reason}); it needs "
            "network access to the Hugging Face hub and `pip install datasets` (set "
            "HF_HUB_OFFLINE=1 to fail fast offline). The sources 'pydoc' and 'files' work offline."
        ) from err


def check_paths(paths: Any, argument: str = "paths") -> list[str]:
    """The text files of ``source="files"``: a non-empty list of existing files.

    Raises:
        PPQConfigError: when ``paths`` is not a non-empty list of existing files.
    """
    if not isinstance(paths, (list, tuple)) or not paths:
        raise bad_value(argument, paths, "a non-empty list of text files for source='files'")
    missing = [p for p in paths if not isinstance(p, (str, Path)) or not Path(p).is_file()]
    if missing:
        raise bad_value(argument, missing, "existing text files")
    return [str(p) for p in paths]


def read_text_file(path: str | Path, argument: str = "paths") -> str:
    """The text of a UTF-8 file of ``paths``.

    Args:
        path: the file.
        argument: the argument that named it (``"calibration_paths"``), for the message.

    Raises:
        PPQConfigError: naming the file, when it is not valid UTF-8 (where the first bad byte
            is) or cannot be read.
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise PPQConfigError(
            f"{argument}: the file {str(path)!r} is not UTF-8 text: byte {byte:#04x} at offset "
            f"{err.start} cannot be decoded ({err.reason}); convert it to UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`), or leave it out of {argument}."
        ) from err
    except OSError as err:
        raise PPQConfigError(
            f"{argument}: the file {str(path)!r} cannot be read ({type(err).__name__}: "
            f"{err.strerror or err})."
        ) from err


def load_corpus(
    source: str, paths: list[str] | None = None, prefix: str = ""
) -> tuple[str, str | None]:
    """The text of a corpus: ``(train_text, eval_text)``; ``eval_text`` is None for corpora
    that have no separate evaluation split (they are split by token position instead).

    Args:
        source: ``pydoc``, ``files``, ``wikitext2`` or ``c4``.
        paths: the text files of ``source="files"``.
        prefix: prefix of the argument names in error messages (``"calibration_"``).

    Raises:
        PPQConfigError: on an unknown source, missing files, or an unreachable hub dataset.
    """
    if source == "pydoc":
        return pydoc_text(), None
    if source == "files":
        paths = check_paths(paths, f"{prefix}paths")
        return "\n\n".join(read_text_file(p, f"{prefix}paths") for p in paths), None
    if source == "wikitext2":
        data = _load_dataset(source, "wikitext", "wikitext-2-raw-v1")
        return "\n\n".join(data["train"]["text"]), "\n\n".join(data["test"]["text"])
    if source == "c4":
        train = _load_dataset(
            source, "allenai/c4", data_files={"train": _C4_SHARDS["train"]}, split="train"
        )
        val = _load_dataset(
            source,
            "allenai/c4",
            data_files={"validation": _C4_SHARDS["validation"]},
            split="validation",
        )
        return "\n\n".join(train[:5000]["text"]), " ".join(val[:1100]["text"])
    raise bad_value(f"{prefix}source", source, f"one of {', '.join(SOURCES)}")


class TextDataModule(L.LightningDataModule):
    """Token windows of a text corpus for evaluation, calibration and training.

    Single-corpus sources (``pydoc``, ``files``) are tokenised once and split by position: the
    first ``1 - eval_fraction`` of the tokens feed calibration and training, the rest
    evaluation, so the two never overlap. ``wikitext2`` and ``c4`` use their own train and
    evaluation splits, as the GPTQ/SparseGPT scripts do (``c4``: the first shard of each split;
    evaluation on its first 1100 documents, calibration and training on its first 5000 train
    documents joined, where GPTQ draws each sample from one random document). Evaluation
    windows are consecutive, non-overlapping, ``seqlen`` long; calibration windows are
    ``num_calibration_samples`` random ``seqlen`` slices of the train part (seeded).
    Batches are ``{"input_ids": (B, seqlen)}``.

    Args:
        source: ``pydoc`` (CPython's documentation text, offline), ``files``, ``wikitext2`` or
            ``c4`` (the last two need ``datasets`` and network).
        tokenizer: ``smollm2-135m``, ``bytes``, a local directory or a hub id.
        seqlen: tokens per window.
        num_calibration_samples: calibration windows.
        max_eval_windows: keep only the first evaluation windows (None: all).
        eval_fraction: share of a single corpus held out for evaluation, in (0, 1).
        batch_size: windows per batch.
        seed: seed of the calibration draw and the training shuffle.
        paths: text files for ``source="files"``.
        calibration_source: take calibration (and training) windows from another source (e.g.
            evaluate on ``pydoc``, calibrate on ``files``); None for the same source.
        calibration_paths: files for ``calibration_source="files"`` (None: ``paths``).

    Raises:
        PPQConfigError: on any invalid argument (booleans are not integers; ``paths`` or
            ``calibration_paths`` given where no source reads them, missing files); in
            ``setup``, a file that is not UTF-8 text, or texts too short for one window.

    Example (YAML)::

        data:
          class_path: ppq_lightning.datamodules.TextDataModule
          init_args: {source: pydoc, tokenizer: smollm2-135m, seqlen: 512, max_eval_windows: 16}
    """

    def __init__(
        self,
        source: str = "pydoc",
        tokenizer: str = OFFLINE_DEFAULT,
        seqlen: int = 512,
        num_calibration_samples: int = 32,
        max_eval_windows: int | None = 16,
        eval_fraction: float = 0.1,
        batch_size: int = 1,
        seed: int = 0,
        paths: list[str] | None = None,
        calibration_source: str | None = None,
        calibration_paths: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_choice("source", source, SOURCES)
        if calibration_source is not None:
            check_choice("calibration_source", calibration_source, SOURCES)
        check_int("seqlen", seqlen, minimum=2)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_calibration_samples", num_calibration_samples, minimum=1)
        check_int("max_eval_windows", max_eval_windows, minimum=1, allow_none=True)
        check_number("eval_fraction", eval_fraction, 0, 1, low_open=True, high_open=True)
        check_int("seed", seed)
        if not isinstance(tokenizer, str) or not tokenizer.strip():
            raise bad_value(
                "tokenizer", tokenizer, "'smollm2-135m', 'bytes', a local directory or a hub id"
            )
        if paths is not None and "files" not in (source, calibration_source):
            raise bad_value(
                "paths",
                paths,
                f"None with source={source!r} and calibration_source={calibration_source!r} "
                "(paths are read for source='files' or calibration_source='files' only)",
            )
        if calibration_paths is not None and calibration_source != "files":
            raise bad_value(
                "calibration_paths",
                calibration_paths,
                f"None with calibration_source={calibration_source!r} (calibration_paths are "
                "read for calibration_source='files' only)",
            )
        if calibration_source == "files" and calibration_paths is None:
            calibration_paths = paths
        if source == "files":
            paths = check_paths(paths)
        if calibration_source == "files":
            calibration_paths = check_paths(calibration_paths, "calibration_paths")
        self.save_hyperparameters()
        self.source, self.tokenizer_name, self.seqlen = source, tokenizer, seqlen
        self.num_calibration_samples, self.max_eval_windows = (
            num_calibration_samples,
            max_eval_windows,
        )
        self.eval_fraction, self.batch_size, self.seed = eval_fraction, batch_size, seed
        self.paths, self.calibration_source = paths, calibration_source
        self.calibration_paths = calibration_paths
        self.eval_windows: Tensor | None = None
        self.train_tokens: Tensor | None = None

    def _tokenize(self, tokenizer: Any, text: str) -> Tensor:
        # one long sequence: no special tokens, no warning about the model's maximum length
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return torch.tensor(ids, dtype=torch.long)

    def _split(
        self, tokenizer: Any, source: str, paths: list[str] | None, prefix: str = ""
    ) -> tuple[Tensor, Tensor]:
        train_text, eval_text = load_corpus(source, paths, prefix)
        if eval_text is not None:
            return self._tokenize(tokenizer, train_text), self._tokenize(tokenizer, eval_text)
        tokens = self._tokenize(tokenizer, train_text)
        cut = int(len(tokens) * (1 - self.eval_fraction))
        return tokens[:cut], tokens[cut:]

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the corpus once (later calls do nothing)."""
        if self.eval_windows is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_name)
        train, held_out = self._split(tokenizer, self.source, self.paths)
        if self.calibration_source is not None:
            train, _ = self._split(
                tokenizer, self.calibration_source, self.calibration_paths, "calibration_"
            )
        n_eval = len(held_out) // self.seqlen
        if min(len(held_out), len(train)) < self.seqlen:
            raise PPQConfigError(
                f"the corpus is too short for seqlen={self.seqlen}: {len(held_out)} evaluation "
                f"and {len(train)} calibration/training tokens, each part needs at least "
                f"{self.seqlen}; use a shorter seqlen, more text, or another eval_fraction."
            )
        if self.max_eval_windows is not None:
            n_eval = min(n_eval, self.max_eval_windows)
        self.eval_windows = held_out[: n_eval * self.seqlen].reshape(n_eval, self.seqlen)
        self.train_tokens = train

    def calibration_windows(self) -> Tensor:
        """``num_calibration_samples`` random windows of the train part, ``(n, seqlen)``."""
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(
            0,
            len(self.train_tokens) - self.seqlen + 1,
            (self.num_calibration_samples,),
            generator=generator,
        )
        return torch.stack([self.train_tokens[s : s + self.seqlen] for s in starts.tolist()])

    def calibration_dataloader(self) -> DataLoader:
        """Calibration batches for layer-wise compression methods (sets up the data itself)."""
        return DataLoader(_Windows(self.calibration_windows()), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Non-overlapping windows of the train part, shuffled (seeded)."""
        self.setup()
        n = len(self.train_tokens) // self.seqlen
        windows = self.train_tokens[: n * self.seqlen].reshape(n, self.seqlen)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            _Windows(windows), batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        """The evaluation windows, in order."""
        self.setup()
        return DataLoader(_Windows(self.eval_windows), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The same windows as ``val_dataloader``."""
        return self.val_dataloader()
