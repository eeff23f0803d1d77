"""The catalogue, part ordinary mistakes that raised raw tracebacks (issue #27, points 7 and 8):
a class path of the current folder or one naming no class, token ids outside the vocabulary, a
tokenizer larger than the model's vocabulary, windows longer than a model's learned positions,
an unquoted ``pattern: 2:4`` (the integer 124), malformed sweep files, QAT with every parameter
frozen, a full disk, DepGraph pruning of an HF Llama; and NumPy scalars, which the checks now
accept as the numbers they hold."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from ppq_lightning import reports
from ppq_lightning.callbacks import (
    GPTQ,
    DepGraphPruning,
    MagnitudePruning,
    QuantizationAwareTraining,
    SparseGPT,
)
from ppq_lightning.cli import main
from ppq_lightning.datamodules import TextDataModule
from ppq_lightning.errors import PPQConfigError, check_int, check_number
from ppq_lightning.models import CausalLMModule
from ppq_lightning.study.sweep import finished
from tests.bad_inputs.helpers import assert_refused, names, tiny_fit_config
from tests.helpers import make_trainer

ROOT = Path(__file__).parents[2]
LLAMA = {
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def _ppq(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python -m ppq_lightning.cli.main ARGV`` run in ``cwd`` (which Python then puts on
    ``sys.path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "ppq_lightning.cli.main", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- point 7: class paths ------------------------------------------------------------------


def test_a_class_path_of_the_current_folder_is_never_imported(tmp_path):
    """``python -m ppq_lightning.cli.main fit --model evilmod.Model`` with ``evilmod.py`` in the
    current folder imported it (its top-level code ran)."""
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: ...\n")
    done = _ppq(tmp_path, "fit", "--model", "evilmod.Model")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--model='evilmod.Model' is not allowed" in done.stderr
    assert "found only in the current folder" in done.stderr
    assert not marker.exists()


def test_a_stdlib_module_is_not_imported_to_look_for_a_missing_class(tmp_path):
    """``--trainer.callbacks+=this.Foo`` imported ``this`` (printing the Zen of Python)."""
    done = _ppq(tmp_path, "fit", "--trainer.callbacks+=this.Foo")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the module 'this' defines no 'Foo'" in done.stderr
    assert "Beautiful is better than ugly" not in done.stdout + done.stderr


# -- token ids, tokenizer and positions that do not fit the model ---------------------------


def test_token_ids_outside_the_vocabulary(tmp_path):
    module = CausalLMModule(model_config=LLAMA)
    ids = torch.arange(32).reshape(2, 16)
    ids[1, 3] = 500
    loader = DataLoader([{"input_ids": row} for row in ids], batch_size=2)
    assert_refused(
        lambda: make_trainer(tmp_path).validate(module, loader, verbose=False),
        PPQConfigError,
        names("token ids from 0 to 500", "vocabulary of 384 tokens", "own tokenizer"),
        model=module,
    )


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_setup(tmp_path):
    module = CausalLMModule(model_config={**LLAMA, "vocab_size": 300})
    data = TextDataModule(tokenizer="bytes", seqlen=16, max_eval_windows=2)
    assert_refused(
        lambda: make_trainer(tmp_path).validate(module, data, verbose=False),
        PPQConfigError,
        names("tokenizer='bytes'", "vocab_size=300", "has 384", "vocab_size >= 384"),
        model=module,
    )


def test_seqlen_above_learned_positions_is_refused_at_setup(tmp_path):
    gpt2 = {"model_type": "gpt2", "vocab_size": 384, "n_embd": 32, "n_layer": 1, "n_head": 2}
    module = CausalLMModule(model_config={**gpt2, "n_positions": 16})
    data = TextDataModule(tokenizer="bytes", seqlen=32, max_eval_windows=2)
    stage = MagnitudePruning(sparsity=0.5)
    assert_refused(
        lambda: make_trainer(tmp_path, callbacks=[stage]).validate(module, data, verbose=False),
        PPQConfigError,
        names("seqlen=32", "max_position_embeddings=16", "seqlen <= 16"),
        model=module,
    )


def test_rotary_positions_take_longer_windows(tmp_path):
    """Llama's rotary positions have no table: windows past max_position_embeddings run."""
    module = CausalLMModule(model_config={**LLAMA, "max_position_embeddings": 8})
    data = TextDataModule(tokenizer="bytes", seqlen=16, max_eval_windows=2)
    make_trainer(tmp_path).validate(module, data, verbose=False)


# -- an unquoted N:M pattern ----------------------------------------------------------------


@pytest.mark.parametrize("stage", [MagnitudePruning, SparseGPT])
def test_an_unquoted_pattern_read_as_an_integer_says_to_quote_it(stage):
    pattern = yaml.safe_load("pattern: 2:4")["pattern"]
    assert pattern == 124
    assert_refused(
        lambda: stage(pattern=pattern), PPQConfigError, names("pattern=124", 'pattern: "2:4"')
    )


# -- malformed sweep files --------------------------------------------------------------------

SWEEPS = [
    (b"- method: grid\n- command: [x]\n", "a list, not a mapping"),
    (b"method: [grid\n", "not valid YAML"),
    ("method: grid\nname: caf\xe9\n".encode("latin-1"), "cannot be read as a text file"),
]


@pytest.mark.parametrize(("content", "said"), SWEEPS, ids=["list", "invalid", "latin-1"])
def test_a_malformed_sweep_file_is_named(tmp_path, content, said):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    output = tmp_path / "out"
    assert_refused(
        lambda: main(["sweep", str(path), "--output", str(output)]),
        PPQConfigError,
        names(f"sweep file {str(path)!r}", said),
        folder=output,
    )


@pytest.mark.parametrize("text", ["null", "[1, 2]", '{"command": null}', "{"])
def test_a_malformed_point_json_reruns_the_point(tmp_path, text):
    (tmp_path / "point.json").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert finished(tmp_path, ["ppq", "validate"]) is None


# -- QAT with nothing to train --------------------------------------------------------------


def test_qat_with_every_parameter_frozen(tmp_path):
    """The backward failed: ``element 0 of tensors does not require grad``."""
    model = BoringModel()
    model.requires_grad_(False)
    stage = QuantizationAwareTraining(bits=4, targets="layer")
    assert_refused(
        lambda: make_trainer(tmp_path, max_steps=2, callbacks=[stage]).fit(model),
        PPQConfigError,
        names("qat: every parameter of BoringModel is frozen", "nothing to train"),
        model=model,
    )


# -- a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")]
)
def test_a_full_disk_names_the_report_and_leaves_it_as_it_was(tmp_path, monkeypatch, code, text):
    path = tmp_path / "schedule.json"
    reports.write_json(path, {"rows": 1})

    def full(*args, **kwargs):
        raise OSError(code, text)

    monkeypatch.setattr(reports.os, "replace", full)
    assert_refused(
        lambda: reports.write_json(path, {"rows": 2}),
        reports.DiskFullError,
        names(f"writing {str(path)!r} failed: {text}", "left as it was", "Free disk space"),
        folder=tmp_path,
    )
    assert json.loads(path.read_text()) == {"rows": 1}


def _file_size_limit(limit: int):
    """A ``preexec_fn``: files may grow to ``limit`` bytes (a write past it fails with EFBIG,
    "File too large", as on a full quota; SIGXFSZ ignored so that the write returns it)."""

    def limit_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_size


def test_a_fit_whose_checkpoint_finds_no_room_ends_with_one_line(tmp_path):
    """Lightning's own checkpoint write fails (EFBIG) inside ``ppq fit``: one line naming the
    error and the file, exit 1, no traceback (it was a 40-line traceback)."""
    tiny_fit_config(tmp_path, max_steps=3)
    done = subprocess.run(
        [sys.executable, "-m", "ppq_lightning.cli.main", "fit", "--config", "fit.yaml"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=_file_size_limit(100_000),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    first, last = done.stderr.strip().splitlines()[-2:]
    checkpoint = tmp_path / "ckpts" / "epoch=0-step=1.ckpt"
    assert (
        first
        == f"ppq: error: no room on the disk writing {str(checkpoint)!r}: [Errno 27] File too large"
    ), first
    assert last.startswith("ppq: fit stopped: the disk was full; stages applied: P, Q"), last
    # running it again as it was ends the same way: say what comes first
    assert "no checkpoint was written; to resume: free space on the disk, then run" in last, last
    assert "(it starts over; no checkpoint had been written yet)" in last, last


def test_other_os_errors_pass_unchanged(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(reports.os, "replace", denied)
    with pytest.raises(PermissionError):
        reports.write_json(tmp_path / "a.json", {})
    assert list(tmp_path.iterdir()) == []


# -- NumPy scalars and 0-d tensors are numbers ------------------------------------------------


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).double()]
)
def test_numpy_scalars_and_0d_tensors_are_accepted_as_numbers(value):
    """They were refused with a range message their value satisfies."""
    accepted = check_number("sparsity", value, 0, 1, high_open=True)
    assert type(accepted) is float and accepted == 0.5
    stage = MagnitudePruning(sparsity=value)
    assert (
        type(stage.config.sparsity) is float
        and stage.identity == MagnitudePruning(sparsity=0.5).identity
    )


def test_numpy_integers_are_accepted_as_ints():
    assert type(check_int("bits", np.int64(4), 2, 8)) is int
    stage = GPTQ(bits=np.int64(4), block_size=torch.tensor(32))
    assert (type(stage.config.bits), type(stage.config.block_size)) == (int, int)
    assert stage.identity == GPTQ(bits=4, block_size=32).identity


@pytest.mark.parametrize("value", [np.bool_(True), torch.tensor(True), torch.tensor([0.5])])
def test_booleans_and_arrays_are_still_refused(value):
    with pytest.raises(PPQConfigError, match="sparsity="):
        check_number("sparsity", value, 0, 1, high_open=True)


# -- DepGraph pruning of an HF Llama ----------------------------------------------------------


def test_depgraph_pruning_of_an_hf_llama_is_refused(tmp_path):
    """Torch-Pruning's group search raised an AttributeError (or hung) on an HF Llama."""
    module = CausalLMModule(model_config=LLAMA)
    data = TextDataModule(tokenizer="bytes", seqlen=16, max_eval_windows=2)
    stage = DepGraphPruning(ratio=0.25)
    assert_refused(
        lambda: make_trainer(tmp_path, callbacks=[stage]).validate(module, data, verbose=False),
        PPQConfigError,
        names("transformers language model", "ChannelPruning", "BlockRemoval"),
        model=module,
    )
