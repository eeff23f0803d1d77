"""The cells of a study: one evaluated order each, cached on disk.

A cell is keyed by its stages' state keys and by the study's *fingerprint* (the dense weights,
the evaluation and calibration data, the metric), so cells of another model or data never
match, and studies sharing a folder (the points of a grid) share the dense model, the curve and
single stages. A cell is written atomically as soon as it is measured: a restarted study
recomputes none of the cells it finished.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppq_lightning.modules.config import is_legacy_key
from ppq_lightning.reports import write_json


@dataclass(frozen=True)
class Cell:
    """One evaluated order: the model after ``order`` (``"dense"`` for no stage).

    Attributes:
        order: stage names joined by ``>``.
        kind: ``"dense"``, ``"single"``, ``"curve"`` (a quantization-only point) or ``"order"``.
        keys: the state keys of the stages, in order (what identifies the cell on disk).
        value: the evaluated metric as logged (e.g. perplexity).
        M: the higher-is-better metric (``-ppl`` for perplexity).
        nominal_C, measured_C, sparsity, avg_bits: from ``compression_summary``.
        seconds: compression and evaluation wall time when it was computed.
        eval_seconds: the evaluation's share of ``seconds`` (0 in cells of older versions).
        metrics: every metric the evaluation reported (perplexity and task metrics of a
            ``CausalLMModule`` with tasks), as logged; empty in cells of older versions.
    """

    order: str
    kind: str
    keys: tuple[str, ...]
    value: float
    M: float
    nominal_C: float
    measured_C: float
    sparsity: float
    avg_bits: float
    seconds: float
    eval_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The cell as a flat row (``keys`` joined by ``>``, each of ``metrics`` a column)."""
        row = {k: v for k, v in asdict(self).items() if k != "metrics"}
        extra = {k: v for k, v in self.metrics.items() if k not in row}
        return row | {"keys": ">".join(self.keys)} | extra


def batch_bytes(batch: Any) -> bytes:
    """The bytes of every tensor in a batch (tensor, dict, list or tuple), for fingerprints."""
    if torch.is_tensor(batch):
        return batch.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(batch, dict):
        return b"".join(k.encode() + batch_bytes(v) for k, v in sorted(batch.items()))
    if isinstance(batch, (list, tuple)):
        return b"".join(batch_bytes(v) for v in batch)
    return repr(batch).encode()


def fingerprint(module: nn.Module, batches: Iterable[Any], metric: str) -> str:
    """What a cell's value depends on besides its stages: the dense weights (their sums), the
    evaluation and calibration batches, and the metric's name."""
    digest = hashlib.sha1(metric.encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                t = tensor.detach().double()
                digest.update(f"{name}{tuple(t.shape)}{t.sum():.10e}{t.abs().sum():.10e}".encode())
    for batch in batches:
        digest.update(batch_bytes(batch))
    return digest.hexdigest()[:16]


class CellCache:
    """The cells of studies with one fingerprint, in memory and in ``folder`` on disk.

    Args:
        folder: where cell files go (``<hash>.json``).
        fingerprint: the study's fingerprint (see :func:`fingerprint`).
    """

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint
        self._cells: dict[tuple[str, ...], Cell] = {}
        self._checked_legacy = False

    def path(self, keys: tuple[str, ...]) -> Path:
        """The file of the cell with the state keys ``keys``."""
        digest = hashlib.sha1(json.dumps([self.fingerprint, *keys]).encode()).hexdigest()[:16]
        return self.folder / f"{digest}.json"

    def get(self, keys: tuple[str, ...]) -> tuple[Cell | None, bool]:
        """``(cell, read_from_disk)``: the cell of ``keys`` (None when not computed; a file that
        cannot be read as a cell is named in a warning and computed again)."""
        if keys in self._cells:
            return self._cells[keys], False
        path = self.path(keys)
        if not path.exists():
            self._warn_legacy()
            return None, False
        try:
            data = json.loads(path.read_text())
            cell = Cell(**{**data, "keys": tuple(data["keys"])})
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as error:
            warnings.warn(
                f"cell file {path} is unreadable ({error!r}); computing the cell again.",
                stacklevel=2,
            )
            return None, False
        if cell.keys != keys:  # a hash collision: recompute rather than trust it
            return None, False
        self._cells[keys] = cell
        return cell, True

    def _warn_legacy(self) -> None:
        """Say once when ``folder`` holds cells keyed by version-1 stage keys (written before a
        stage's identity covered every argument): they are never matched, so their orders are
        computed again rather than reinterpreted."""
        if self._checked_legacy:
            return
        self._checked_legacy = True
        legacy = 0
        for path in self.folder.glob("*.json") if self.folder.is_dir() else ():
            try:
                keys = json.loads(path.read_text()).get("keys", [])
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
                continue
            legacy += any(isinstance(k, str) and is_legacy_key(k) for k in keys)
        if legacy:
            warnings.warn(
                f"{legacy} cell file(s) in {self.folder} were keyed by stage keys of an earlier "
                "ppq-lightning, which left out arguments that change the weights (targets, "
                "damping, calibration settings); they are not reused, and this study computes "
                "its cells again (delete them to silence this).",
                stacklevel=3,
            )

    def put(self, cell: Cell) -> None:
        """Keep ``cell`` and write it (atomically: on disk whole or not at all)."""
        write_json(self.path(cell.keys), asdict(cell))
        self._cells[cell.keys] = cell
