"""The calibration engine observes an nn.MultiheadAttention's projections: Q/K/V see the query,
key and value the attention receives, out_proj the attention output before it."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.demos import LightningTransformer
from torch import nn

from ppq_lightning.calibration.engine import calibrate_sequentially
from ppq_lightning.calibration.statistics import LayerStatistics
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import resolve_targets
from ppq_lightning.ops.hessian import accumulate_hessian

VOCAB = 64


def _demo() -> tuple[LightningTransformer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    module = LightningTransformer(vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (2, 9), generator=generator) for _ in range(3)]
    return module, [(t[:, :-1], t[:, 1:]) for t in tokens]


def _forward(model: nn.Module, batch: tuple) -> torch.Tensor:
    return model(*batch)


def _reference(module: nn.Module, attention: str, batches: list) -> dict[str, torch.Tensor]:
    """The Hessians of the attention's projections from what a plain forward hands it."""
    mha = module.get_submodule(attention)
    identity = copy.deepcopy(mha).eval()  # torch's own attention, an identity out_proj
    with torch.no_grad():
        identity.out_proj.weight.copy_(torch.eye(mha.embed_dim))
        identity.out_proj.bias.zero_()
    rows: dict[str, list[torch.Tensor]] = {"q_proj": [], "k_proj": [], "v_proj": [], "out_proj": []}

    def record(m: nn.Module, args: tuple, kwargs: dict) -> None:
        query, key, value = (*args, *[kwargs[k] for k in ("query", "key", "value") if k in kwargs])
        options = {k: v for k, v in kwargs.items() if k not in ("query", "key", "value")}
        heads = nn.MultiheadAttention.forward(identity, query, key, value, **options)[0]
        for name, x in zip(rows, (query, key, value, heads), strict=True):
            rows[name].append(x.reshape(-1, x.shape[-1]))

    handle = mha.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            module.eval()
            for batch in batches:
                _forward(module, batch)
    finally:
        handle.remove()
    hessians = {}
    for name, parts in rows.items():
        acc, seen = None, 0
        for x in parts:
            acc, seen = accumulate_hessian(acc, x, seen, torch.float64)
        hessians[name] = acc.float()
    return hessians


@pytest.mark.parametrize(
    "attention",
    [
        "model.transformer.encoder.layers.1.self_attn",  # outside the decoder blocks
        "model.transformer.decoder.layers.0.self_attn",
        "model.transformer.decoder.layers.1.multihead_attn",  # cross: key/value = memory
    ],
)
def test_each_projection_sees_what_the_attention_receives(attention):
    module, batches = _demo()
    expected = _reference(module, attention, batches)
    targets = resolve_targets(module, targets=rf"^{attention}\.")
    assert [n.rpartition(".")[2] for n in targets] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    statistics = LayerStatistics("hessian", "float64")
    got: dict[str, torch.Tensor] = {}

    def keep(layers: dict[str, nn.Module]) -> None:
        got.update(statistics.take(list(layers)))
        statistics.end_block()

    calibrate_sequentially(
        module, targets, batches, statistics.observe, keep, "original", forward=_forward
    )
    for name, hessian in expected.items():
        torch.testing.assert_close(got[f"{attention}.{name}"], hessian, rtol=1e-4, atol=1e-5)
    if "multihead_attn" in attention:  # the decoder stream and the memory differ
        assert not torch.allclose(expected["q_proj"], expected["k_proj"])


class _OwnForward(nn.MultiheadAttention):
    def forward(self, query, key, value, **kwargs):
        return super().forward(query, key, value, need_weights=False)


def test_an_attention_whose_own_forward_reads_its_weights_is_refused_before_calibrating():
    model = nn.Sequential(nn.Linear(8, 8))
    model.attention = _OwnForward(8, 2)
    targets = resolve_targets(model, targets="attention")

    def untouched(layers: dict[str, nn.Module]) -> None:
        raise AssertionError("nothing may be compressed")

    with pytest.raises(PPQConfigError, match=r"attention.q_proj is a projection of _OwnForward"):
        calibrate_sequentially(model, targets, [torch.randn(2, 8)], lambda *a: None, untouched)
