"""Text corpora tokenised into fixed-length windows, with a calibration split."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ppq_lightning.datamodules.stateful import ordered_dataloader, shuffled_dataloader
from ppq_lightning.errors import PPQConfigError, bad_value, check_choice, check_int, check_number
from ppq_lightning.models.loading import OFFLINE_DEFAULT, load_tokenizer

SOURCES = ("pydoc", "files", "wikitext2", "c4")
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
C4_EVAL_DOCUMENTS = 1100  # documents of C4's validation shard per evaluation split (as GPTQ)


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


class Corpus(NamedTuple):
    """The text of a corpus by split.

    Attributes:
        train: the text calibration and training draw from (a single corpus: all of it).
        validation: the text of ``val_dataloader``; None for a single corpus (``pydoc``,
            ``files``), which is split by token position instead.
        test: the text of ``test_dataloader``, disjoint from ``validation``; None for a single
            corpus.
    """

    train: str
    validation: str | None = None
    test: str | None = None


def load_corpus(source: str, paths: list[str] | None = None, prefix: str = "") -> Corpus:
    """The text of a corpus, by split (see :class:`TextDataModule` for which text each split
    of each source is).

    Args:
        source: ``pydoc``, ``files``, ``wikitext2`` or ``c4``.
        paths: the text files of ``source="files"``.
        prefix: prefix of the argument names in error messages (``"calibration_"``).

    Returns:
        The :class:`Corpus`: ``wikitext2`` gives its train, validation and test splits; ``c4``
        its first 5000 train documents, and documents ``[0, 1100)`` (validation) and
        ``[1100, 2200)`` (test) of its first validation shard; ``pydoc`` and ``files`` one text.

    Raises:
        PPQConfigError: on an unknown source, missing files, or an unreachable hub dataset.
    """
    if source == "pydoc":
        return Corpus(pydoc_text())
    if source == "files":
        paths = check_paths(paths, f"{prefix}paths")
        return Corpus("\n\n".join(read_text_file(p, f"{prefix}paths") for p in paths))
    if source == "wikitext2":
        data = _load_dataset(source, "wikitext", "wikitext-2-raw-v1")
        splits = ("train", "validation", "test")
        return Corpus(*("\n\n".join(data[split]["text"]) for split in splits))
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
        n = C4_EVAL_DOCUMENTS
        return Corpus(
            "\n\n".join(train[:5000]["text"]),
            " ".join(val[:n]["text"]),
            " ".join(val[n : 2 * n]["text"]),
        )
    raise bad_value(f"{prefix}source", source, f"one of {', '.join(SOURCES)}")


class TextDataModule(L.LightningDataModule):
    """Token windows of a text corpus for validation, test, calibration and training.

    Which text each split reads (deterministic; validation and test never share a token):

    - ``pydoc``, ``files`` (one text, tokenised once, split by position): the first
      ``1 - eval_fraction`` of the tokens feed calibration and training; the rest is held out
      and cut into consecutive windows. Validation reads the first ``max_eval_windows`` of
      them, test the ones after those (at most ``max_eval_windows``). With
      ``max_eval_windows=None`` validation reads every held-out window and none is left for
      test: ``test_dataloader`` raises.
    - ``wikitext2``: its own splits — calibration and training from ``train``, validation from
      ``validation``, test from ``test`` (the split GPTQ and SparseGPT report perplexity on).
    - ``c4``: the first shard of each split, as the GPTQ/SparseGPT scripts take it —
      calibration and training from its first 5000 train documents joined (GPTQ draws each
      sample from one random document), validation from documents 0-1099 of the validation
      shard (GPTQ's evaluation set), test from documents 1100-2199 of the same shard (C4 has
      no test split).

    Validation and test windows are consecutive, non-overlapping, ``seqlen`` long, at most
    ``max_eval_windows`` of each; calibration windows are ``num_calibration_samples`` random
    ``seqlen`` slices of the train part (seeded). Batches are ``{"input_ids": (B, seqlen)}``.

    Args:
        source: ``pydoc`` (CPython's documentation text, offline), ``files``, ``wikitext2`` or
            ``c4`` (the last two need ``datasets`` and network).
        tokenizer: ``smollm2-135m``, ``bytes``, a local directory or a hub id.
        seqlen: tokens per window.
        num_calibration_samples: calibration windows.
        max_eval_windows: keep only the first validation windows, and as many test windows
            (None: all; then a single corpus has none left for test).
        eval_fraction: share of a single corpus held out for validation and test, in (0, 1).
        batch_size: windows per batch.
        seed: seed of the calibration draw and the training shuffle.
        paths: text files for ``source="files"``.
        calibration_source: take calibration (and training) windows from another source (e.g.
            evaluate on ``pydoc``, calibrate on ``files``); None for the same source.
        calibration_paths: files for ``calibration_source="files"`` (None: ``paths``).

    Raises:
        PPQConfigError: on any invalid argument (booleans are not integers; ``paths`` or
            ``calibration_paths`` given where no source reads them, missing files); in
            ``setup``, a file that is not UTF-8 text, or texts too short for one window; in
            ``test_dataloader``, no test window (see above).

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
        self.test_windows: Tensor | None = None
        self.train_tokens: Tensor | None = None
        self.tokenizer_size: int | None = None  # tokens of the tokenizer, known after setup

    def _tokenize(self, tokenizer: Any, text: str) -> Tensor:
        # one long sequence: no special tokens, no warning about the model's maximum length
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return torch.tensor(ids, dtype=torch.long)

    def _split(
        self,
        tokenizer: Any,
        source: str,
        paths: list[str] | None,
        prefix: str = "",
        held_out: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(train, validation, test)`` tokens of ``source``. A single corpus gives all its
        held-out tokens as ``validation`` and None as ``test`` (its test windows follow the
        validation windows); ``held_out=False`` (a calibration source) tokenises no split of
        a hub corpus but ``train``."""
        corpus = load_corpus(source, paths, prefix)
        if corpus.validation is not None:
            if not held_out:
                return self._tokenize(tokenizer, corpus.train), None, None
            train, validation, test = (self._tokenize(tokenizer, text) for text in corpus)
            return train, validation, test
        tokens = self._tokenize(tokenizer, corpus.train)
        cut = int(len(tokens) * (1 - self.eval_fraction))
        return tokens[:cut], tokens[cut:], None

    def _windows(self, tokens: Tensor) -> Tensor:
        """The first ``max_eval_windows`` (None: all) consecutive ``seqlen`` windows of
        ``tokens``, ``(n, seqlen)``."""
        n = len(tokens) // self.seqlen
        if self.max_eval_windows is not None:
            n = min(n, self.max_eval_windows)
        return tokens[: n * self.seqlen].reshape(n, self.seqlen)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the corpus once (later calls do nothing)."""
        if self.eval_windows is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_name)
        self.tokenizer_size = len(tokenizer)
        train, held_out, test = self._split(tokenizer, self.source, self.paths)
        if self.calibration_source is not None:
            train, _, _ = self._split(
                tokenizer,
                self.calibration_source,
                self.calibration_paths,
                "calibration_",
                held_out=False,
            )
        if min(len(held_out), len(train)) < self.seqlen:
            raise PPQConfigError(
                f"the corpus is too short for seqlen={self.seqlen}: {len(held_out)} evaluation "
                f"and {len(train)} calibration/training tokens, each part needs at least "
                f"{self.seqlen}; use a shorter seqlen, more text, or another eval_fraction."
            )
        self.eval_windows = self._windows(held_out)
        if test is None:  # a single corpus: the held-out windows after the validation ones
            test = held_out[self.eval_windows.numel() :]
        self.test_windows = self._windows(test)
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
        return ordered_dataloader(_Windows(self.calibration_windows()), batch_size=self.batch_size)

    def train_dataloader(self) -> StatefulDataLoader:
        """Non-overlapping windows of the train part, shuffled (epoch ``e`` from ``seed + e``).
        A ``StatefulDataLoader``: its position is saved in every checkpoint, so a ``fit``
        resumed mid-epoch reads the batches the uninterrupted one would
        (``datamodules.stateful``)."""
        self.setup()
        n = len(self.train_tokens) // self.seqlen
        windows = self.train_tokens[: n * self.seqlen].reshape(n, self.seqlen)
        return shuffled_dataloader(_Windows(windows), self.seed, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """The evaluation windows, in order."""
        self.setup()
        return ordered_dataloader(_Windows(self.eval_windows), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The test windows, in order: held out like the validation windows and disjoint from
        them (which text, per source: see the class docstring).

        Raises:
            PPQConfigError: when there is no test window: a single corpus whose held-out part
                the validation windows use up (``max_eval_windows=None`` or too large for
                ``eval_fraction``), or a test split shorter than ``seqlen``.
        """
        self.setup()
        if len(self.test_windows) == 0:
            if self.source in ("pydoc", "files"):
                held_out = len(self.eval_windows)
                raise PPQConfigError(
                    f"source={self.source!r} has no test window left: its held-out part "
                    f"(eval_fraction={self.eval_fraction}) holds {held_out} window(s) of "
                    f"seqlen={self.seqlen}, and validation reads all of them "
                    f"(max_eval_windows={self.max_eval_windows}); test reads the held-out "
                    "windows after the validation ones, so set max_eval_windows below "
                    f"{held_out}, or raise eval_fraction."
                )
            raise PPQConfigError(
                f"source={self.source!r}: its test split is shorter than seqlen={self.seqlen} "
                "tokens; use a shorter seqlen."
            )
        return ordered_dataloader(_Windows(self.test_windows), batch_size=self.batch_size)
