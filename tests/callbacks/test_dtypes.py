"""Every method on bf16 and fp16 models, against the same model in float32.

The models are written the way their users write them (an HF Llama built from a tiny
``LlamaConfig`` inside a plain LightningModule; a torchvision ResNet with a torchmetrics
accuracy), held in bf16 or fp16 by ``Trainer(precision="bf16-true" | "16-true")``. The float32
reference starts from the very same weights (each rounded to the low dtype and back), so the
two runs differ only in arithmetic. Checked after every method: every weight and buffer keeps the
model's dtype (the recorded grids stay float32), the invariants hold exactly (a bf16 weight is a
float32 grid value rounded once: ``QuantGrid.on_grid``), and the decisions agree with float32's.

Where a method's decision depends only on the weights and float32 statistics of identical inputs
(the first layer of an MLP fed the batch itself), masks and codes are identical; deeper layers
see activations computed in bf16 and agree up to a bound each test states.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchmetrics
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.calibration import statistics as stats_module
from ppq_lightning.callbacks.registry import build_stage
from ppq_lightning.compressed.state import compressed_modules
from ppq_lightning.modules.views import weight_matrix
from tests.user_modules import modules

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}
CALIBRATED = {"num_calibration_batches": 2}
TRAINS = {"lora", "qat", "codeq", "sqs"}
# spec -> (the least share of mask entries, of codes) equal to float32's over the whole model
LLAMA = {
    "magnitude:0.5": (1.0, None),
    "wanda:0.5": (0.97, None),
    "sparsegpt:0.5": (0.9, None),
    "rtn:4": (None, 1.0),
    "gptq:4": (None, 0.8),
    "gptq:3,group_size=16,symmetric=true": (None, 0.8),
    "sparsegpt:0.5,bits=4": (0.9, 0.8),
    "block_removal:0.5": (None, None),
    "channels:0.25": (None, None),
    "sharing:0.8,group_size=2": (None, None),
    "joint:3": (None, None),
    "lora:4": (None, None),
    "qat:4": (None, 0.8),
    "codeq:4": (None, None),
    "sqs:4": (None, None),
}
RESNET = {
    "magnitude:0.5": (1.0, None),
    "wanda:0.5": (0.97, None),
    "sparsegpt:0.5": (0.9, None),
    "rtn:4": (None, 1.0),
    "gptq:4": (None, 0.8),
    "depgraph:0.25": (None, None),
    "fold": (None, None),
    "bn": (None, None),
    "lora:4": (None, None),
    "qat:4": (None, 0.8),
    "codeq:4": (None, None),
    "sqs:4": (None, None),
}


class TinyResNet(L.LightningModule):
    """A user's classifier: a torchvision ResNet (one BasicBlock per stage), torchmetrics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = torchvision.models.resnet.BasicBlock
        self.net = torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], num_classes=10)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class MLP(L.LightningModule):
    """A user's MLP classifier whose first layer reads the batch itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)
        )

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def _images(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _vectors(dtype: torch.dtype, n: int = 64) -> DataLoader:
    """Random inputs that ``dtype`` holds exactly (so both runs read the same numbers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g).to(dtype).float()
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=16)


MODELS = {
    "llama": (modules.UserCausalLM, modules.token_dicts, LLAMA),
    "resnet": (TinyResNet, _images, RESNET),
}


def _held_by(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with every floating weight and buffer rounded to ``dtype`` and back."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).float())
    return model


def _run(
    factory, loader, spec: str, dtype: torch.dtype, held: torch.dtype, tmp_path, **extra
) -> nn.Module:
    """``spec`` applied by a Trainer holding the model in ``dtype`` (weights ``held``-exact)."""
    model = _held_by(factory(), held)
    method = spec.split(":")[0].split(",")[0]
    arguments = {} if method in TRAINS or method in ("fold", "bn") else dict(CALIBRATED)
    if method in ("fold", "bn"):
        arguments = {"num_calibration_batches": 2} if method == "bn" else {}
    if method in ("channels", "joint", "block_removal", "sparsegpt", "gptq", "wanda"):
        arguments["block_checkpoints"] = False
    stage = build_stage(spec, **arguments, **extra)
    trainer = L.Trainer(
        callbacks=[stage],
        default_root_dir=tmp_path,
        precision=PRECISION[dtype],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=2 if method in TRAINS else 0,
        limit_val_batches=2,
        deterministic=True,
    )
    if method in TRAINS:
        trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader())
    else:
        trainer.validate(model, dataloaders=loader(), verbose=False)
    return model


def _decisions(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each compressed layer's mask and codes (read back from its weight on its own grid)."""
    found = {}
    for name, layer, state in compressed_modules(model):
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        entry = {}
        if state.mask is not None:
            entry["mask"] = state.mask
        if state.grid is not None:
            entry["codes"] = state.grid.codes(weight_matrix(layer).detach())
        found[name] = entry
    return found


def _agreement(a: dict, b: dict, key: str) -> float | None:
    same = total = 0
    for name, entry in a.items():
        other = b.get(name, {})
        if key in entry and key in other and entry[key].shape == other[key].shape:
            same += int((entry[key] == other[key]).sum())
            total += entry[key].numel()
    return same / total if total else None


def _assert_kept_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if ".ppq_state." in f".{name}":  # the recorded grid: float32 whatever the model
            assert tensor.dtype == torch.float32, name
        else:
            assert tensor.dtype == dtype, f"{name} is {tensor.dtype}, not the model's {dtype}"


# pure fp16 training with the user's AdamW (eps=1e-8 is 0 in fp16) turns the Llama's weights to
# NaN within two steps, with or without a compression stage (the invariants refuse the result):
# the training stages run on the fp16 Llama with an optimizer fp16 can hold only, so not here
FP16_ADAMW = {("llama", s, "fp16") for s in ("qat:4", "codeq:4", "sqs:4")}
# fp16 goes through the same dtype paths as bf16: it is checked on the methods that decide from
# statistics and grids (the suite's time), bf16 on every method
FP16 = {"magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "rtn:4", "gptq:4"}
CASES = [
    (m, spec, d)
    for m, (_, _, specs) in MODELS.items()
    for spec in specs
    for d in LOW
    if (m, spec, d) not in FP16_ADAMW and (d == "bf16" or spec in FP16)
]


@pytest.mark.parametrize(("family", "spec", "low"), CASES)
def test_method_on_a_low_precision_model_against_float32(family, spec, low, tmp_path):
    factory, loader, specs = MODELS[family]
    dtype = LOW[low]
    model = _run(factory, loader, spec, dtype, dtype, tmp_path / "low")
    _assert_kept_dtype(model, dtype)
    check_invariants(model)  # exact: every quantized weight a float32 grid value rounded once
    reference = _run(factory, loader, spec, torch.float32, dtype, tmp_path / "f32")
    masks, codes = specs[spec]
    low_decisions, ref_decisions = _decisions(model), _decisions(reference)
    assert low_decisions.keys() == ref_decisions.keys()  # the same layers compressed
    if masks is not None:
        assert _agreement(low_decisions, ref_decisions, "mask") >= masks
    if codes is not None:
        assert _agreement(low_decisions, ref_decisions, "codes") >= codes


@pytest.mark.parametrize("spec", ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "rtn:4", "gptq:4"])
@pytest.mark.parametrize("low", list(LOW))
def test_first_layer_decisions_equal_float32_on_the_same_inputs(spec, low, tmp_path):
    """The first layer reads the batch (held exactly by both dtypes): its float32 statistics
    are the same numbers, so its mask and codes equal float32's exactly."""
    dtype = LOW[low]
    runs = [
        _run(MLP, lambda: _vectors(dtype), spec, d, dtype, tmp_path / str(d), targets=["net.0"])
        for d in (dtype, torch.float32)
    ]
    low_first, ref_first = (_decisions(m)["net.0"] for m in runs)
    for key in ref_first:
        assert torch.equal(low_first[key], ref_first[key]), key


@pytest.mark.parametrize("statistics_dtype", ["float32", "float64"])
def test_statistics_are_summed_in_the_requested_dtype_on_a_bf16_model(
    statistics_dtype, tmp_path, monkeypatch
):
    seen = []
    accumulate = stats_module.ACCUMULATORS["hessian"]

    def spy(acc, rows, n, dtype):
        result = accumulate(acc, rows, n, dtype)
        seen.append((rows.dtype, result[0].dtype))
        return result

    monkeypatch.setitem(stats_module.ACCUMULATORS, "hessian", spy)
    spec = f"gptq:4,statistics_dtype={statistics_dtype}"
    model = _run(*MODELS["llama"][:2], spec, torch.bfloat16, torch.bfloat16, tmp_path)
    _assert_kept_dtype(model, torch.bfloat16)
    assert seen and {s[0] for s in seen} == {torch.bfloat16}  # the model ran in bf16
    assert {s[1] for s in seen} == {getattr(torch, statistics_dtype)}


def test_bf16_8_bit_asymmetric_grid_warns_and_stays_exact(tmp_path):
    """An asymmetric 8-bit grid has levels up to 255 steps from its zero point; bf16 rounds
    neighbours there to one value. The weights are still exactly on the grid as bf16 holds it
    (the invariants), the codes read back reproduce them, and the user is told."""
    from ppq_lightning.callbacks.stage import GridPrecisionWarning

    with pytest.warns(GridPrecisionWarning, match=r"round to the same bfloat16 value"):
        model = _run(*MODELS["llama"][:2], "rtn:8", torch.bfloat16, torch.bfloat16, tmp_path)
    assert check_invariants(model) > 0
    for _, layer, state in compressed_modules(model):
        w = weight_matrix(layer).detach()
        assert torch.equal(state.grid.held(state.grid.codes(w), w.dtype), w)


@pytest.mark.parametrize("spec", ["rtn:8,symmetric=true", "rtn:4"])
def test_grids_bf16_holds_level_by_level_do_not_warn(spec, tmp_path, recwarn):
    from ppq_lightning.callbacks.stage import GridPrecisionWarning

    _run(*MODELS["llama"][:2], spec, torch.bfloat16, torch.bfloat16, tmp_path)
    assert not [w for w in recwarn if issubclass(w.category, GridPrecisionWarning)]


def test_a_cast_to_bf16_keeps_the_recorded_grid(tmp_path):
    """``model.to(torch.bfloat16)`` after quantizing in float32 (what ``precision="bf16-true"``
    does to a compressed model) keeps the float32 grid: the weights are then exactly its
    values rounded once, and a scale rounded to bf16 (another grid) is never recorded."""
    model = _run(*MODELS["llama"][:2], "gptq:4", torch.float32, torch.float32, tmp_path)
    scales = {n: s.scale.clone() for n, _, s in compressed_modules(model)}
    model.to(torch.bfloat16)
    for name, _, state in compressed_modules(model):
        assert state.scale.dtype == torch.float32 and torch.equal(state.scale, scales[name])
    assert check_invariants(model) == len(scales)
