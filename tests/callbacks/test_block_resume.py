"""Resume a calibrated stage at block granularity (issue #28, point 4).

A stage killed at block k (here: the solve raises there; scripts/bench_resume.py sends a real
SIGKILL) and run again with the same arguments continues from its last finished block and ends
with exactly the weights, compression records and metrics of an uninterrupted run.
"""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import ppq_lightning.calibration.scoring as scoring
import ppq_lightning.callbacks.channel_pruning as channel_pruning
import ppq_lightning.order.joint_search as joint_search
from ppq_lightning.calibration.progress import ProgressMismatchWarning
from ppq_lightning.callbacks import (
    GPTQ,
    BlockRemoval,
    ChannelPruning,
    JointStructuralMixedPrecision,
    SparseGPT,
    Wanda,
)
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.offload import offload_to_disk
from tests.helpers import assert_same_state as _assert_same
from tests.helpers import plain_llama
from tests.helpers import state_copy as _state

BLOCKS = 4
EDIT = channel_pruning.apply_channel_edits


class LlamaLM(L.LightningModule):
    """A plain LightningModule around a tiny HF Llama, as a user writes one."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = plain_llama(seed, layers=BLOCKS)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def validation_step(self, batch, batch_idx):
        logits = self(batch)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        self.log("val_loss", loss)


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=generator) for _ in range(3)]


METHODS = {
    "gptq": lambda **kw: GPTQ(bits=3, group_size=16, num_calibration_batches=3, **kw),
    "sparsegpt": lambda **kw: SparseGPT(sparsity=0.5, num_calibration_batches=3, **kw),
    "wanda": lambda **kw: Wanda(sparsity=0.5, num_calibration_batches=3, **kw),
    "channels": lambda **kw: ChannelPruning(
        ratio=0.5, structure="both", num_calibration_batches=3, **kw
    ),
}


class Crash(RuntimeError):
    pass


def _crashing_at(stage, block: int, solved: list[str], monkeypatch=None):
    """Make ``stage`` raise when it reaches a layer of ``block`` (``None``: never); record the
    layers it solves (channel pruning: the parents whose channels it removes)."""
    if isinstance(stage, ChannelPruning):
        edit = EDIT

        def apply_channel_edits(parent, edits, entry):
            name = next(n for n, m in stage_model[0].named_modules() if m is parent)
            if block is not None and f".layers.{block}." in name:
                raise Crash(f"killed at block {block}")
            solved.append(name)
            return edit(parent, edits, entry)

        monkeypatch.setattr(channel_pruning, "apply_channel_edits", apply_channel_edits)
        return stage
    solve = stage.compress_layer

    def compress_layer(name, layer, statistic):
        if block is not None and f".layers.{block}." in name:
            raise Crash(f"killed at block {block}")
        solved.append(name)
        return solve(name, layer, statistic)

    stage.compress_layer = compress_layer
    return stage


def _metrics(result):
    return {n: {k: v for k, v in m.items() if k != "seconds"} for n, m in result.layers.items()}


stage_model = [None]  # the model a crashing channel pruning walks


def _run(
    method, folder, crash=None, calibrate_on="compressed", data_seed=0, monkeypatch=None, **kw
):
    model, solved = LlamaLM(), []
    stage_model[0] = model
    stage = METHODS[method](block_checkpoints=str(folder), calibrate_on=calibrate_on, **kw)
    _crashing_at(stage, crash, solved, monkeypatch)
    result = stage.apply(model, dataloader=_batches(data_seed))
    return model, result, solved, stage


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each method's result without a crash (and without files: block_checkpoints=False)."""
    out = {}
    for method in METHODS:
        for calibrate_on in ("compressed", "original"):
            model, stage = LlamaLM(), METHODS[method](block_checkpoints=False)
            if calibrate_on == "original":
                stage = METHODS[method](block_checkpoints=False, calibrate_on="original")
            result = stage.apply(model, dataloader=_batches())
            out[method, calibrate_on] = (_state(model), _metrics(result))
    return out


@pytest.mark.parametrize("calibrate_on", ["compressed", "original"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("crash", range(BLOCKS))
def test_a_run_killed_at_any_block_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, uninterrupted, method, calibrate_on, crash
):
    with pytest.raises(Crash):
        _run(method, tmp_path, crash, calibrate_on, monkeypatch=monkeypatch)
    folder = next((tmp_path / "ppq_progress").iterdir())
    assert len(list(folder.glob("block-*.safetensors"))) == crash  # the finished blocks
    resumed, result, solved, stage = _run(
        method, tmp_path, None, calibrate_on, monkeypatch=monkeypatch
    )
    state, metrics = uninterrupted[method, calibrate_on]
    _assert_same(_state(resumed), state)
    assert _metrics(result) == metrics
    assert solved and not any(f".layers.{i}." in n for n in solved for i in range(crash))
    assert stage.calibration_report.resumed_blocks == crash
    assert not (tmp_path / "ppq_progress").exists()  # deleted once the stage succeeded


def test_a_crash_leaves_the_model_as_it_was_and_the_files_on_disk(tmp_path):
    model, stage, solved = LlamaLM(), METHODS["gptq"](block_checkpoints=str(tmp_path)), []
    before = _state(model)
    _crashing_at(stage, 2, solved)
    with pytest.raises(Crash) as info:
        stage.apply(model, dataloader=_batches())
    _assert_same(_state(model), before)
    assert "restored" in " ".join(getattr(info.value, "__notes__", []))
    assert len(list((tmp_path / "ppq_progress").rglob("block-*.safetensors"))) == 2


@pytest.mark.parametrize("change", ["stage", "data", "model"])
def test_progress_of_another_stage_data_or_model_is_not_used(tmp_path, change):
    with pytest.raises(Crash):
        _run("gptq", tmp_path, crash=3)
    if change == "stage":
        kwargs, data_seed, expected = {"damp": 0.02}, 0, "the stage's configuration"
    elif change == "data":
        kwargs, data_seed, expected = {}, 1, "the calibration data"
    else:
        kwargs, data_seed, expected = {}, 0, "the model's weights outside its blocks"
    model, solved = LlamaLM(), []
    if change == "model":
        with torch.no_grad():
            model.model.lm_head.weight[0, 0] += 1
    stage = _crashing_at(METHODS["gptq"](block_checkpoints=str(tmp_path), **kwargs), None, solved)
    with pytest.warns(ProgressMismatchWarning, match=expected):
        stage.apply(model, dataloader=_batches(data_seed))
    assert stage.calibration_report.resumed_blocks == 0
    assert any(".layers.0." in n for n in solved)
    reference = LlamaLM()
    if change == "model":
        with torch.no_grad():
            reference.model.lm_head.weight[0, 0] += 1
    METHODS["gptq"](block_checkpoints=False, **kwargs).apply(
        reference, dataloader=_batches(data_seed)
    )
    _assert_same(_state(model), _state(reference))


def test_an_earlier_stage_that_produced_other_weights_invalidates_the_blocks(tmp_path):
    """A schedule Wanda > GPTQ killed in GPTQ, rerun with another Wanda sparsity: GPTQ's
    folder is the same (the blocks' weights are not in the fingerprint), yet no block of it is
    used: each block's hash before GPTQ differs."""
    model = LlamaLM()
    Wanda(sparsity=0.5, block_checkpoints=False).apply(model, dataloader=_batches())
    stage = _crashing_at(METHODS["gptq"](block_checkpoints=str(tmp_path)), 2, [])
    with pytest.raises(Crash):
        stage.apply(model, dataloader=_batches())
    model = LlamaLM()
    Wanda(sparsity=0.25, block_checkpoints=False).apply(model, dataloader=_batches())
    stage = METHODS["gptq"](block_checkpoints=str(tmp_path))
    with pytest.warns(ProgressMismatchWarning, match="block 0's weights differ"):
        stage.apply(model, dataloader=_batches())
    assert stage.calibration_report.resumed_blocks == 0


def test_under_a_trainer_the_files_live_in_its_default_root_dir(tmp_path):
    """On by default under a Trainer: the files are under ``default_root_dir`` (not a
    versioned logger folder), so the same command finds them; a crash leaves them, the rerun
    uses them and deletes them."""

    def trainer(stage):
        return L.Trainer(
            callbacks=[stage],
            default_root_dir=tmp_path,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )

    loader = DataLoader(torch.cat(_batches()), batch_size=2)
    stage = _crashing_at(Wanda(sparsity=0.5, num_calibration_batches=3), 1, [])
    with pytest.raises(Crash):
        trainer(stage).validate(LlamaLM(), loader)
    assert len(list((tmp_path / "ppq_progress").rglob("block-*.safetensors"))) == 1
    stage = Wanda(sparsity=0.5, num_calibration_batches=3)
    trainer(stage).validate(LlamaLM(), loader)
    assert stage.calibration_report.resumed_blocks == 1
    assert not (tmp_path / "ppq_progress").exists()


def test_without_a_trainer_nothing_is_written_unless_a_folder_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = _crashing_at(Wanda(sparsity=0.5), 1, [])
    with pytest.raises(Crash):
        stage.apply(LlamaLM(), dataloader=_batches())
    assert not any(tmp_path.iterdir())


def test_block_checkpoints_is_not_part_of_the_identity():
    assert GPTQ(bits=4).state_key == GPTQ(bits=4, block_checkpoints="/tmp/x").state_key
    assert GPTQ(bits=4).state_key == GPTQ(bits=4, block_checkpoints=False).state_key


@pytest.mark.parametrize("value", [None, "", "  ", 3, ["a"]])
def test_a_bad_block_checkpoints_is_refused_naming_it(value):
    with pytest.raises(PPQConfigError, match="block_checkpoints="):
        GPTQ(bits=4, block_checkpoints=value)


@pytest.mark.parametrize("crash", range(3))
def test_sleb_killed_at_any_step_resumes_to_the_uninterrupted_removal(tmp_path, monkeypatch, crash):
    """SLEB's loop is not the engine: each step's choice (block, loss) is saved, and a rerun
    replays the saved steps instead of scoring them again."""
    reference = LlamaLM()
    expected = BlockRemoval(n_blocks=3, block_checkpoints=False).apply(
        reference, dataloader=_batches()
    )
    scored = []
    score = scoring.candidate_losses

    def candidate_losses(*args, **kwargs):
        if len(scored) == crash:
            raise Crash(f"killed at step {crash}")
        scored.append(1)
        return score(*args, **kwargs)

    monkeypatch.setattr(scoring, "candidate_losses", candidate_losses)
    with pytest.raises(Crash):
        BlockRemoval(n_blocks=3, block_checkpoints=str(tmp_path)).apply(
            LlamaLM(), dataloader=_batches()
        )
    monkeypatch.setattr(scoring, "candidate_losses", score)
    model, stage = LlamaLM(), BlockRemoval(n_blocks=3, block_checkpoints=str(tmp_path))
    calls = []
    monkeypatch.setattr(
        scoring, "candidate_losses", lambda *a, **k: calls.append(1) or score(*a, **k)
    )
    result = stage.apply(model, dataloader=_batches())
    assert stage.resumed_steps == crash and len(calls) == 3 - crash
    _assert_same(_state(model), _state(reference))
    assert _metrics(result) == _metrics(expected)
    assert not (tmp_path / "ppq_progress").exists()


def _joint(**kw):
    return JointStructuralMixedPrecision(
        budget=5.0, bits=[8, 4, 3, 2], keep=[1.0, 0.75, 0.5], score_batches=2, **kw
    )


@pytest.mark.parametrize("at", ["first", "second", "middle", "last"])
def test_the_joint_search_killed_at_any_move_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, at
):
    """The joint search's loop is not the engine: its state after each move (levels, moves,
    loss, the deltas scored) is saved, and a rerun takes it up."""
    reference, stage = LlamaLM(), _joint(block_checkpoints=False)
    expected = stage.apply(reference, dataloader=_batches())
    moves = len(stage.search_log)
    assert moves >= 4
    crash = {"first": 0, "second": 1, "middle": moves // 2, "last": moves - 1}[at]
    chosen = []
    choose = joint_search.best_move

    def best_move(*args):
        if len(chosen) == crash:
            raise Crash(f"killed at move {crash}")
        chosen.append(1)
        return choose(*args)

    monkeypatch.setattr(joint_search, "best_move", best_move)
    with pytest.raises(Crash):
        _joint(block_checkpoints=str(tmp_path)).apply(LlamaLM(), dataloader=_batches())
    calls = []
    monkeypatch.setattr(joint_search, "best_move", lambda *a: calls.append(1) or choose(*a))
    model, stage = LlamaLM(), _joint(block_checkpoints=str(tmp_path))
    result = stage.apply(model, dataloader=_batches())
    assert stage.resumed_moves == crash and len(calls) == moves - crash
    _assert_same(_state(model), _state(reference))
    assert _metrics(result) == _metrics(expected)
    assert not (tmp_path / "ppq_progress").exists()


@pytest.mark.parametrize("method", ["gptq", "channels"])
def test_weights_on_disk_resume_to_the_in_memory_result(
    tmp_path, monkeypatch, uninterrupted, method
):
    """A model whose weights are memory-mapped files (``modules.offload``): the saved blocks
    load into the materialized block, which is written back as the engine does it."""

    def on_disk(name):
        model = LlamaLM()
        offload_to_disk(model, tmp_path / name)
        stage_model[0] = model
        return model

    stage = METHODS[method](block_checkpoints=str(tmp_path))
    _crashing_at(stage, 2, [], monkeypatch)
    with pytest.raises(Crash):
        stage.apply(on_disk("first"), dataloader=_batches())
    model, solved = on_disk("second"), []
    stage = _crashing_at(
        METHODS[method](block_checkpoints=str(tmp_path)), None, solved, monkeypatch
    )
    result = stage.apply(model, dataloader=_batches())
    state, metrics = uninterrupted[method, "compressed"]
    _assert_same(_state(model), state)
    assert _metrics(result) == metrics and stage.calibration_report.resumed_blocks == 2
