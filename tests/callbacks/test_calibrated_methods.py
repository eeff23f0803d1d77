import itertools

import pytest
import torch
from torch import nn

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    GPTQ,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.compressed.state import get_state
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.models import CausalLMModule
from ppq_lightning.modules.targets import resolve_targets
from tests.helpers import TINY_LLAMA, make_trainer

PRUNERS = {
    "magnitude": lambda: MagnitudePruning(sparsity=0.5, name="P"),
    "wanda": lambda: Wanda(sparsity=0.5, name="P", num_calibration_batches=2),
    "sparsegpt": lambda: SparseGPT(sparsity=0.5, name="P", num_calibration_batches=2),
    "2:4": lambda: SparseGPT(pattern="2:4", name="P", num_calibration_batches=2),
}
QUANTIZERS = {
    "rtn": lambda: RTNQuantization(bits=4, name="Q"),
    "gptq": lambda: GPTQ(bits=4, name="Q", num_calibration_batches=2),
}


@pytest.mark.parametrize(
    ("pruner", "quantizer", "p_first"),
    list(itertools.product(PRUNERS, QUANTIZERS, [True, False])),
)
def test_chaining_keeps_invariants_in_either_order(tmp_path, tiny_data, pruner, quantizer, p_first):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stages = [PRUNERS[pruner](), QUANTIZERS[quantizer]()]
    stages = stages if p_first else stages[::-1]
    make_trainer(tmp_path, stages).validate(module, datamodule=tiny_data, verbose=False)
    assert check_invariants(module) == 14
    for layer in resolve_targets(module).values():
        state = get_state(layer)
        assert state.bits == 4 and state.mask is not None
        assert (1 - state.mask.float().mean()).item() == pytest.approx(0.5, abs=0.02)
    summary = stages[-1].result.summary
    assert summary.nominal_C == pytest.approx(8.0, rel=0.05)


def test_gptq_beats_rtn_on_the_tiny_model(tiny_data):
    ppl = {}
    for name, stage in (
        ("rtn", RTNQuantization(bits=3)),
        ("gptq", GPTQ(bits=3, num_calibration_batches=4)),
    ):
        module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
        result = stage.apply(module, dataloader=tiny_data.calibration_dataloader())
        ppl[name] = module.evaluate(tiny_data.val_dataloader())["ppl"]
        if name == "gptq":
            layer = result.layers["model.model.layers.0.mlp.up_proj"]
            assert {"relative_error", "damp", "damp_retries", "seconds", "bits"} <= set(layer)
    assert ppl["gptq"] < ppl["rtn"]


def test_calibration_from_the_validation_loader_without_a_calibration_method(tmp_path, tiny_data):
    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    stage = GPTQ(bits=4, num_calibration_batches=2)
    make_trainer(tmp_path, [stage]).validate(module, tiny_data.val_dataloader(), verbose=False)
    assert stage.calibration_report.n_batches == 2


def test_missing_calibration_data(tiny_lm):
    with pytest.raises(PPQConfigError, match="needs calibration data"):
        GPTQ(bits=4).apply(tiny_lm)
    with pytest.raises(PPQConfigError, match="calibration dataloader is empty"):
        GPTQ(bits=4).apply(tiny_lm, dataloader=[])


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_conv2d_layers_through_gptq_and_sparsegpt():
    torch.manual_seed(0)
    model = TinyCNN()
    images = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    SparseGPT(sparsity=0.5, num_calibration_batches=3).apply(model, dataloader=images)
    GPTQ(bits=4, num_calibration_batches=3).apply(model, dataloader=images)
    assert check_invariants(model) == 2  # the blocks: the stem and the head stay dense
    assert get_state(model.stem) is None and get_state(model.head) is None
    conv = model.blocks[0]
    assert (conv.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_bad_arguments():
    with pytest.raises(PPQConfigError, match="calibrate_on='dense'"):
        GPTQ(bits=4, calibrate_on="dense")
    with pytest.raises(PPQConfigError, match="num_calibration_batches=0"):
        Wanda(sparsity=0.5, num_calibration_batches=0)
    with pytest.raises(PPQConfigError, match=r"scope='global'.*row, layer"):
        Wanda(sparsity=0.5, scope="global")
    with pytest.raises(PPQConfigError, match="damp=-1"):
        SparseGPT(sparsity=0.5, damp=-1)
    with pytest.raises(PPQConfigError, match=r"pattern='3:2'"):
        SparseGPT(pattern="3:2")
    with pytest.raises(PPQConfigError, match=r"statistics_dtype='float16'.*float32, float64"):
        GPTQ(bits=4, statistics_dtype="float16")
    with pytest.raises(PPQConfigError, match="act_order='yes' is not allowed: expected true or"):
        GPTQ(bits=4, act_order="yes")
    with pytest.raises(PPQConfigError, match="symmetric='true' is not allowed"):
        SparseGPT(sparsity=0.5, bits=4, symmetric="true")


@pytest.mark.parametrize("cls", [GPTQ, Wanda])
def test_device_must_parse_as_a_torch_device(cls):
    kwargs = {"bits": 4} if cls is GPTQ else {"sparsity": 0.5}
    with pytest.raises(PPQConfigError, match=r"device='bogus' is not allowed: expected None or a"):
        cls(device="bogus", **kwargs)
    with pytest.raises(PPQConfigError, match="device=3 is not allowed"):
        cls(device=3, **kwargs)
    assert cls(device="cuda:1", **kwargs).device == "cuda:1"  # parsed, not yet looked for


def test_a_cuda_device_without_cuda_is_refused_before_any_weight_changes(monkeypatch, tiny_lm):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    stage = GPTQ(bits=4, device="cuda", num_calibration_batches=2)
    with pytest.raises(PPQConfigError, match=r"device='cuda' names CUDA, but CUDA is not avail"):
        stage.apply(tiny_lm, dataloader=[torch.zeros(2, 8, dtype=torch.long)] * 2)
    after = tiny_lm.state_dict()
    assert before.keys() == after.keys() and all(
        torch.equal(v, after[k]) for k, v in before.items()
    )


@pytest.mark.parametrize(("cls", "kwargs"), [(GPTQ, {"bits": 3}), (Wanda, {"sparsity": 0.5})])
def test_float64_statistics_do_not_depend_on_the_batch_order(monkeypatch, cls, kwargs):
    """Summed in float64, the statistic every layer is solved with is the same bit for bit
    whatever the order of the calibration batches (in float32 most entries differ)."""
    data = [
        {"input_ids": torch.randint(0, 384, (1, 48), generator=torch.Generator().manual_seed(i))}
        for i in range(6)
    ]
    seen: list[dict[str, torch.Tensor]] = []
    real = cls.compress_layer

    def spy(self, name, layer, statistic):
        seen[-1][name] = statistic.clone()
        assert statistic.dtype == torch.float32  # the solvers get float32
        return real(self, name, layer, statistic)

    monkeypatch.setattr(cls, "compress_layer", spy)
    for batches in (data, data[::-1]):
        seen.append({})
        module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
        stage = cls(**kwargs, num_calibration_batches=6, statistics_dtype="float64")
        stage.apply(module, dataloader=batches)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) == 14
    for name, statistic in seen[0].items():
        assert torch.equal(statistic, seen[1][name]), name


def test_layers_fed_one_input_share_one_hessian_and_match_their_own(monkeypatch):
    """q/k/v (and gate/up) read the same tensor: one Hessian is accumulated for them, and each
    layer's GPTQ result equals GPTQ with the Hessian of its own captured inputs."""
    from ppq_lightning.calibration.statistics import ACCUMULATORS
    from ppq_lightning.ops.gptq import gptq

    module = CausalLMModule(model_config=TINY_LLAMA, seed=0)
    data = [
        {"input_ids": torch.randint(0, 384, (1, 32), generator=torch.Generator().manual_seed(i))}
        for i in range(3)
    ]
    block = module.model.model.layers[0]
    captured: list[torch.Tensor] = []
    handle = block.self_attn.k_proj.register_forward_hook(
        lambda m, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in data:
            module(batch["input_ids"])
    handle.remove()
    x = torch.cat(captured)
    expected = gptq(block.self_attn.k_proj.weight.detach(), 2 * x.T @ x / len(x), 4).weight

    calls = []
    real = ACCUMULATORS["hessian"]
    monkeypatch.setitem(ACCUMULATORS, "hessian", lambda *a: calls.append(1) or real(*a))
    GPTQ(bits=4, num_calibration_batches=3, log_layers=False).apply(module, dataloader=data)
    assert len(calls) == 4 * 2 * 3  # q, o, gate, down per block and batch (not 7)
    torch.testing.assert_close(block.self_attn.k_proj.weight, expected, rtol=0, atol=1e-6)
