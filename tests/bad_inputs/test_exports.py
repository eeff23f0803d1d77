"""Bad inputs of exports and loaders (issue #27, points 5 and 6): scales a file's dtype cannot
hold, overwrites that would destroy or hide data, odd paths, a full disk, killed overwrites,
flipped bytes, crafted files that would make the loader allocate before refusing, a hub id
without a network, and a file that is no checkpoint."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ppq_lightning
from ppq_lightning.callbacks import MagnitudePruning, RTNQuantization
from ppq_lightning.edits.loading import enable_state_loading
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.export import export_lightning_checkpoint, load_compressed
from ppq_lightning.export.native import WEIGHTS
from ppq_lightning.models import CausalLMModule
from tests.bad_inputs.helpers import assert_refused, names
from tests.helpers import TINY_LLAMA, token_batches

ROOT = Path(__file__).parents[2]
LAYER = "model.layers.0.self_attn.q_proj"
CT = "compressed-tensors"


def _lm(factor: float, stage: RTNQuantization, embedding: float = 1.0) -> CausalLMModule:
    """A tiny Llama whose first query projection is ``factor`` times larger, compressed."""
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    with torch.no_grad():
        module.model.get_submodule(LAYER).weight.mul_(factor)
        module.model.get_input_embeddings().weight.mul_(embedding)
    stage.apply(module, dataloader=token_batches(2))
    return module


def _boring(seed: int = 0) -> BoringModel:
    """Lightning's BoringModel with its one Linear quantized to 4 bits."""
    torch.manual_seed(seed)
    model = BoringModel()
    RTNQuantization(bits=4, targets="layer").apply(model, dataloader=[torch.randn(2, 32)])
    return model


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- point 1: scales that do not fit the file's dtype ------------------------------------------


Q4_0 = {"bits": 4, "group_size": 32, "symmetric": True}


@pytest.mark.parametrize(
    ("factor", "reason"), [(1e8, "exceeds the largest torch.float16"), (1e-9, "would be 0")]
)
def test_gguf_scales_that_fp16_turns_into_inf_or_zero_are_refused(tmp_path, factor, reason):
    # before: an overflowing scale decoded to inf/NaN while export.json reported an error of
    # 3e-5 (max(0.0, nan)); an underflowing one decoded the whole group to 0
    module = _lm(factor, RTNQuantization(**Q4_0))
    assert_refused(
        lambda: ppq_lightning.export(module, "gguf", tmp_path / "g"),
        PPQConfigError,
        names(LAYER, "scale", reason, "GGUF"),
        model=module,
        folder=tmp_path / "g",
    )
    assert list(tmp_path.iterdir()) == []  # no staging folder either


def test_a_nan_gguf_decode_error_is_an_error_not_zero(tmp_path, monkeypatch):
    # the last line of defence: max(0.0, nan) is 0.0, so a NaN block passed as exact
    from ppq_lightning.export import gguf

    monkeypatch.setattr(gguf, "_check_scales", lambda *args: None)  # let the overflow through
    module = _lm(1e8, RTNQuantization(**Q4_0))
    assert_refused(
        lambda: ppq_lightning.export(module, "gguf", tmp_path / "g"),
        PPQConfigError,
        names(LAYER, "inf or NaN"),
        model=module,
        folder=tmp_path / "g",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("factor", "reason"), [(1e8, "exceeds the largest torch.float16"), (1e-9, "would be 0")]
)
def test_compressed_tensors_float16_scales_that_do_not_fit_are_refused(tmp_path, factor, reason):
    # before: dtype=float16 wrote an inf scale, or a 0 scale that decodes the layer to 0
    module = _lm(factor, RTNQuantization(bits=4, group_size=32))
    assert_refused(
        lambda: ppq_lightning.export(
            module, "compressed-tensors", tmp_path / "ct", dtype="float16"
        ),
        PPQConfigError,
        names(LAYER, "scale", reason, "dtype='float16'"),
        model=module,
        folder=tmp_path / "ct",
    )
    # float32 holds them: the same model exports
    ppq_lightning.export(module, "compressed-tensors", tmp_path / "ct", dtype="float32")


def test_compressed_tensors_float16_refuses_a_weight_it_cannot_hold(tmp_path):
    module = _lm(1.0, RTNQuantization(bits=4, group_size=32), embedding=1e6)
    key = "model.embed_tokens.weight"
    assert_refused(
        lambda: ppq_lightning.export(
            module, "compressed-tensors", tmp_path / "ct", dtype="float16"
        ),
        PPQConfigError,
        names(key, "largest magnitude", "would be stored as inf"),
        model=module,
        folder=tmp_path / "ct",
    )


# -- point 2: overwrite replaces only an earlier export, atomically -----------------------------


def test_overwrite_refuses_a_folder_that_is_not_an_export(tmp_path):
    # before: overwrite=True deleted any folder at the path (a user's notes were lost)
    model = _boring()
    notes = tmp_path / "out"
    notes.mkdir()
    (notes / "notes.md").write_text("three weeks of notes")
    assert_refused(
        lambda: ppq_lightning.export(model, "ppq", notes, overwrite=True),
        PPQConfigError,
        names(str(notes), "export.json", "overwrite never deletes"),
        model=model,
        folder=notes,
    )
    assert _hidden(tmp_path) == []


def test_overwrite_refuses_an_export_a_user_added_files_to(tmp_path):
    model = _boring()
    out = tmp_path / "out"
    ppq_lightning.export(model, "ppq", out)
    (out / "notes.md").write_text("results")
    assert_refused(
        lambda: ppq_lightning.export(_boring(1), "ppq", out, overwrite=True),
        PPQConfigError,
        names(str(out), "notes.md", "not part of the export"),
        model=model,
        folder=out,
    )


def test_overwrite_refuses_a_file(tmp_path):
    file = tmp_path / "out"
    file.write_text("not a folder")
    assert_refused(
        lambda: ppq_lightning.export(_boring(), "ppq", file, overwrite=True),
        PPQConfigError,
        names(str(file), "it is a file"),
        folder=file,
    )


def test_overwrite_replaces_an_earlier_export(tmp_path):
    out = tmp_path / "out"
    ppq_lightning.export(_boring(0), "ppq", out)
    new = _boring(1)
    ppq_lightning.export(new, "ppq", out, overwrite=True)
    loaded = load_compressed(out, model=BoringModel())
    assert torch.equal(loaded.layer.weight, new.layer.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [("", "not empty"), (".", "names the export folder"), ("..", "names the export folder")],
)
def test_paths_that_name_no_folder_are_refused(tmp_path, monkeypatch, path, allowed):
    # before: "." and "" crashed raw after writing a complete export into a hidden folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export.json").write_text("{}")  # even where "." looks like an export
    assert_refused(
        lambda: ppq_lightning.export(_boring(), "ppq", path, overwrite=True),
        PPQConfigError,
        names(f"path={path!r}", allowed),
        folder=tmp_path,
    )
    assert _hidden(tmp_path) == []


def test_a_folder_holding_the_working_directory_is_refused(tmp_path, monkeypatch):
    inside = tmp_path / "out" / "inside"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    assert_refused(
        lambda: ppq_lightning.export(_boring(), "ppq", tmp_path / "out", overwrite=True),
        PPQConfigError,
        names("current working directory"),
        folder=tmp_path,
    )


def test_a_dangling_symlink_is_refused_and_nothing_is_hidden(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    assert_refused(
        lambda: ppq_lightning.export(_boring(), "ppq", link),
        PPQConfigError,
        names(str(link), "symlink", "does not exist"),
        folder=tmp_path,
    )
    assert _hidden(tmp_path) == [] and link.is_symlink()


def test_a_symlinked_folder_is_written_through(tmp_path):
    # before: the link was replaced by a folder; now the link stays and its folder is written
    real = tmp_path / "real"
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    ppq_lightning.export(_boring(0), "ppq", link, overwrite=True)  # an empty folder: allowed
    new = _boring(1)
    ppq_lightning.export(new, "ppq", link, overwrite=True)
    assert link.is_symlink() and (real / WEIGHTS).is_file()
    assert torch.equal(load_compressed(link, model=BoringModel()).layer.weight, new.layer.weight)
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_names_the_path_and_leaves_the_old_export(tmp_path, monkeypatch, code):
    import safetensors.torch

    out = tmp_path / "out"
    old = _boring(0)
    ppq_lightning.export(old, "ppq", out)

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    info = assert_refused(
        lambda: ppq_lightning.export(_boring(1), "ppq", out, overwrite=True),
        OSError,
        names(str(out), os.strerror(code)),
        folder=out,
    )
    assert info.value.errno == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden folder


def test_a_real_full_disk_during_export_is_an_oserror_naming_the_path(tmp_path):
    """safetensors' writer raises its own ``SafetensorError`` (no ``OSError``, no path) when a
    write fails; under a real file-size limit the export is an ``OSError`` naming the path."""
    out = tmp_path / "out"
    script = (
        "import resource, signal\n"
        "import ppq_lightning\n"
        "from ppq_lightning.callbacks import MagnitudePruning\n"
        "from ppq_lightning.models import CausalLMModule\n"
        "from tests.helpers import TINY_LLAMA\n"
        "module = CausalLMModule(model_config=TINY_LLAMA, seed=0)\n"
        "MagnitudePruning(sparsity=0.5).apply(module)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "try:\n"
        f"    ppq_lightning.export(module, 'ppq', {str(out)!r})\n"
        "except OSError as err:\n"
        "    print('OSError', err.errno, err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert line.startswith(f"OSError {errno.EFBIG} [Errno 27] writing the export at {out} "), line
    assert "File too large" in line
    assert list(tmp_path.iterdir()) == []  # no export, no hidden folder


def test_an_export_takes_the_modes_the_umask_gives(tmp_path):
    """``mkdtemp`` made the export folder 0700 and safetensors its files 0600: other users of a
    shared model folder could not read an export."""
    previous = os.umask(0o022)
    try:
        ppq_lightning.export(_boring(), "ppq", tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {
        p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]
    }
    assert modes == {"out": 0o755, WEIGHTS: 0o644, "export.json": 0o644}


def test_an_unwritable_parent_names_the_path(tmp_path, monkeypatch):
    # a read-only folder, as root (who ignores permissions) cannot make one: mkdtemp refuses
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    model = _boring()  # compressed first: a stage's rollback spills through tempfile too
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert_refused(
        lambda: ppq_lightning.export(model, "ppq", tmp_path / "new" / "out"),
        PermissionError,
        names(str(tmp_path / "new" / "out"), "Permission denied"),
        folder=tmp_path,
    )
    assert list(tmp_path.iterdir()) == []  # the parent it created is removed too


_KILLED = r"""
import os, signal, sys
from pathlib import Path
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
import ppq_lightning
from ppq_lightning.callbacks import RTNQuantization
from ppq_lightning.export import api, folder as F

moment, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(1)
model = BoringModel()
RTNQuantization(bits=4, targets="layer").apply(model, dataloader=[torch.randn(2, 32)])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "writing":  # the new export half written
    api.write_manifest = lambda folder, manifest: die()
elif moment == "between_renames":  # the fallback without renameat2
    F._exchange = lambda a, b: False
    real_rename = Path.rename
    def rename(self, target):
        result = real_rename(self, target)
        if Path(target).name.startswith(f".{out.name}.ppq-old-"):
            die()
        return result
    Path.rename = rename
elif moment == "after_exchange":
    real_exchange = F._exchange
    def exchange(a, b):
        assert real_exchange(a, b)
        die()
    F._exchange = exchange
ppq_lightning.export(model, "ppq", out, overwrite=True)
"""


@pytest.mark.parametrize("moment", ["writing", "between_renames", "after_exchange"])
def test_an_overwrite_killed_at_any_moment_loses_nothing(tmp_path, moment):
    # before: a kill between the overwrite's two renames left nothing at the path (old and new
    # hidden in dot-folders)
    out = tmp_path / "out"
    old = _boring(0)
    ppq_lightning.export(old, "ppq", out)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, moment, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]  # the kill landed mid-export
    assert _hidden(tmp_path), "the kill left no hidden folder: it did not land mid-swap"
    assert out.exists() == (moment != "between_renames")
    loaded = load_compressed(out, model=BoringModel())  # recovers a killed swap first
    expected = _boring(1) if moment == "after_exchange" else old
    assert torch.equal(loaded.layer.weight, expected.layer.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # leftovers removed


def test_the_next_export_recovers_a_killed_overwrite(tmp_path):
    out = tmp_path / "out"
    ppq_lightning.export(_boring(0), "ppq", out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    backup = tmp_path / f".out.ppq-old-{dead.pid}-{host}-abc"
    out.rename(backup)  # what the fallback's first rename leaves when killed
    with pytest.raises(PPQConfigError, match="does not exist yet"):
        ppq_lightning.export(_boring(1), "ppq", out)  # the old export is back, not replaced
    assert (out / "export.json").is_file() and _hidden(tmp_path) == []


# -- point 3: checksums in export.json ------------------------------------------------------


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path):
    # before: the native export had no checksum, and a flipped bit loaded as another model
    out = tmp_path / "out"
    manifest = ppq_lightning.export(_boring(), "ppq", out)
    assert set(manifest["sha256"]) == {WEIGHTS}
    data = bytearray((out / WEIGHTS).read_bytes())
    data[-3] ^= 0x10  # a weight's byte, not the header
    (out / WEIGHTS).write_bytes(bytes(data))
    assert_refused(
        lambda: load_compressed(out, model=BoringModel()),
        PPQConfigError,
        names(str(out / WEIGHTS), "sha256"),
        folder=out,
    )


# -- point 4: declared sizes checked before allocating ------------------------------------------


def _max_rss_mib(code: str) -> tuple[float, str]:
    """Peak memory (MiB) a fresh process gains running ``code``, and its last output line."""
    script = (
        "import resource, torch, ppq_lightning\n"
        "from ppq_lightning.export import load_compressed, export_lightning_checkpoint\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    {code}\n    print('LOADED')\n"
        "except Exception as err:\n    print(type(err).__name__, str(err).replace(chr(10), ' '))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.strip().splitlines()
    assert len(lines) >= 2, done.stderr[-2000:]
    return float(lines[-1]), lines[-2]


def _rewrite_metadata(file: Path, edit) -> None:
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        metadata = json.loads(handle.metadata()["ppq"])
    edit(metadata)
    save_file(tensors, str(file), metadata={"ppq": json.dumps(metadata)})


def _crafted_config(metadata):
    config = metadata["architecture"]["config"]
    config.update(hidden_size=4096, intermediate_size=8192)  # about 1.2 GB of weights


def _crafted_record(metadata):
    record = metadata["encodings"][f"model.{LAYER}.weight"]
    assert record["encoding"] == "values"  # a pruned weight's kept values: zeros, then filled
    record["shape"] = [20000, 20000]  # 1.6 GB of float32


@pytest.mark.parametrize(
    ("stage", "craft"),
    [
        (lambda: RTNQuantization(bits=4), _crafted_config),
        (lambda: MagnitudePruning(sparsity=0.5), _crafted_record),
    ],
)
def test_a_crafted_native_export_is_refused_before_allocating(tmp_path, stage, craft):
    # before: the loader built a 1.3-1.6 GB model (or decoded tensor) before refusing
    out = tmp_path / "out"
    ppq_lightning.export(_lm(1.0, stage()), "ppq", out)
    (out / "export.json").unlink()  # crafted files come without our checksums
    _rewrite_metadata(out / WEIGHTS, craft)
    grown, result = _max_rss_mib(f"load_compressed({str(out)!r})")
    assert grown < 300, f"the loader took {grown:.0f} MiB before refusing: {result}"
    assert result.startswith("PPQConfigError") and "refused before" in result, result
    assert str(out) in result


def test_a_crafted_checkpoint_is_refused_before_allocating(tmp_path):
    module = _lm(1.0, RTNQuantization(bits=4))
    ckpt = tmp_path / "crafted.ckpt"
    hparams = dict(module.hparams)
    hparams["model_config"] = {**TINY_LLAMA, "hidden_size": 4096, "intermediate_size": 8192}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, ckpt)
    code = f"export_lightning_checkpoint({str(ckpt)!r}, 'ppq', {str(tmp_path / 'x')!r})"
    grown, result = _max_rss_mib(code)
    assert grown < 300, f"the loader took {grown:.0f} MiB before refusing: {result}"
    assert result.startswith("PPQConfigError") and "refused before building" in result, result
    assert not (tmp_path / "x").exists()


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(8, 6)


def _lora_state(r: int) -> dict:
    """The state dict of a kept LoRA adapter whose record says rank ``r`` (its tensors: 2)."""
    from peft import LoraConfig, inject_adapter_in_model

    from ppq_lightning.compressed.state import record_stage
    from ppq_lightning.edits.lora import ADAPTER, LORA_ADAPTERS, LORA_METHOD, adapter_weights

    source = _Attention()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias="none")
    inject_adapter_in_model(config, source, adapter_name=ADAPTER)
    entry = {"stage": "L", "method": LORA_METHOD, "kind": "L", "r": r, "alpha": 4}
    entry |= {"dropout": 0.0, "edit": LORA_ADAPTERS}
    entry["adapter_weights"] = adapter_weights(source.q_proj)
    record_stage(source.q_proj.get_base_layer(), entry)
    return source.state_dict()


def _shared_state(rank: int) -> dict:
    """The state dict of a shared-basis layer whose record says ``rank``."""
    from ppq_lightning.compressed.state import record_stage
    from ppq_lightning.edits.sharing import SharedBasisLinear, sharing_record

    source = _Attention()
    shared = SharedBasisLinear(nn.Linear(8, 3, bias=False), nn.Linear(3, 6), "g")
    record = sharing_record(shared) | {"rank": rank}
    record_stage(shared, {"stage": "S", "kind": "S", "shared_basis": record})
    source.q_proj = shared
    return source.state_dict()


@pytest.mark.parametrize(
    ("state", "field"),
    [(lambda: _lora_state(10**6), "r=1000000"), (lambda: _shared_state(10**6), "rank=1000000")],
)
def test_a_crafted_structural_record_is_refused_before_allocating(state, field):
    # before: the replay built a rank-10**6 adapter (or basis): 14M weights for an 8x6 layer, then
    # the strict load refused the file for its shapes
    fresh = _Attention()
    enable_state_loading(fresh)
    assert_refused(
        lambda: fresh.load_state_dict(state()),
        PPQConfigError,
        names("q_proj", field, "allows an integer from 1 to", "before anything was allocated"),
        fresh,
    )


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_without_network_fails_fast(tmp_path, monkeypatch, offline):
    # before: about 50 s of retries before the error (offline mode not set); the network is
    # made unreachable here by refusing every name lookup, whatever the machine has

    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")  # as without DNS

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # tests/conftest.py sets it
    for variable in (
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(variable, raising=False)
    module = _lm(1.0, RTNQuantization(bits=4))
    ckpt = tmp_path / "hub.ckpt"
    hparams = {**module.hparams, "model": "someone/not-cached-135M", "model_config": None}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, ckpt)
    start = time.monotonic()
    with pytest.raises(PPQConfigError) as info:
        export_lightning_checkpoint(ckpt, "ppq", tmp_path / "x")
    assert time.monotonic() - start < 10
    for part in ("someone/not-cached-135M", "Hugging Face cache", "cannot be reached"):
        assert part in str(info.value)
    assert not (tmp_path / "x").exists()


# -- point 4 of the raw tracebacks: a file that is no checkpoint --------------------------------


def test_ppq_export_of_a_file_that_is_no_checkpoint_names_it(tmp_path):
    # before: IndexError: pop from empty list
    notes = tmp_path / "notes.yaml"
    notes.write_text("model: smollm2-135m\nlr: 0.01\n")
    from ppq_lightning.cli.export import export_main

    assert_refused(
        lambda: export_main(
            ["--ckpt", str(notes), "--format", "ppq", "--path", str(tmp_path / "x")]
        ),
        PPQConfigError,
        names(f"ckpt={str(notes)!r}", "checkpoint file", "Trainer"),
        folder=tmp_path / "x",
    )
