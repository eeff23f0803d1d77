"""GPTQ, SparseGPT and Wanda give, bit for bit, the weights of a straightforward reference
(issue #28: every speed-up of the solvers, the statistics or the engine must leave the
compressed state dict unchanged).

The reference below is written from the papers' algorithms, independently of ``ppq_lightning``:
a plain forward of the whole model with hooks on one block's linear layers at a time
(calibrating on the model compressed so far), the running Hessian / squared-norm means of the
reference implementations (IST-DASLab ``add_batch``, Wanda's ``scaler_row``) over tokens, the
min-max grid of ``Quantizer.find_params``, and the column walk with lazy block updates, one
column at a time. Its float operations are those of the reference code, on the transposed
weight (columns as contiguous rows, as ours walks them): the paper's own layout rounds its
outer-product updates differently (no fused multiply-add), so it agrees only to float32
rounding, which ``tests/ops/test_obs.py`` checks.
"""

import math

import lightning as L
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ppq_lightning.callbacks import GPTQ, SparseGPT, Wanda

WIDTH, BLOCK_SIZE = 64, 32  # a block of 32 columns: the lazy update runs between blocks


class LlamaLM(L.LightningModule):
    """A plain LightningModule around a tiny HF Llama, as a user writes one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 24), generator=generator) for _ in range(3)]


# --- the reference ---------------------------------------------------------------------------


def _hessian(inputs: list[torch.Tensor]) -> torch.Tensor:
    """``2 X^T X / N`` as a running mean over batches (IST-DASLab ``add_batch``, N in tokens)."""
    h, n = None, 0
    for x in inputs:
        x = x.reshape(-1, x.shape[-1]).float()
        h = torch.zeros(x.shape[1], x.shape[1]) if h is None else h
        h *= n / (n + x.shape[0])
        n += x.shape[0]
        x = math.sqrt(2 / n) * x
        h += x.t().matmul(x)
    return h


def _act_norms(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Running mean of ``x_j^2`` per input feature over tokens (Wanda's ``scaler_row``)."""
    acc, n = None, 0
    for x in inputs:
        x = x.reshape(-1, x.shape[-1]).float()
        total = (x * x).sum(dim=0)
        acc = total / (n + x.shape[0]) if acc is None else acc * (n / (n + x.shape[0]))
        if n:
            acc = acc + total / (n + x.shape[0])
        n += x.shape[0]
    return acc


def _find_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """GPTQ's ``Quantizer.find_params`` per row of ``w`` (rows, cols): scale and zero."""
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(1).values, torch.zeros(w.shape[0]))
    xmax = torch.maximum(w.max(1).values, torch.zeros(w.shape[0]))
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = xmax == xmin
    scale = torch.where(empty, torch.ones_like(xmax), (xmax - xmin) / maxq)
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale)
    return scale, zero + 0.0, maxq


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def _inverse_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H^-1`` (dead inputs get a unit diagonal)."""
    h = h.clone()
    diagonal = torch.diag(h)
    diagonal = torch.where(diagonal == 0, torch.ones_like(diagonal), diagonal)
    h[range(len(h)), range(len(h))] = diagonal + damp * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _gptq(w, h, bits, group_size=None, act_order=False, sparsity=None):
    """GPTQ (``sparsity`` None) or SparseGPT (``bits`` None) on ``w`` (rows, cols)."""
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    w = w.float().clone()
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    hinv = _inverse_factor(h[perm][:, perm])
    wt = w.t()[perm].contiguous()  # (cols, rows): column i is row i
    gs = group_size or cols
    grids = {}  # group -> (scale, zero, maxq); per channel and with act_order: fixed up front
    if bits is not None and (group_size is None or act_order):
        grids = {g // gs: _find_params(w[:, g : g + gs], bits, False) for g in range(0, cols, gs)}
    for i1 in range(0, cols, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, cols)
        errors = torch.zeros(i2 - i1, rows)
        if sparsity is not None:  # the block's mask: its lowest w^2 / [H^-1]_ii^2
            saliency = wt[i1:i2] ** 2 / torch.diag(hinv)[i1:i2, None] ** 2
            order = torch.sort(saliency.flatten(), stable=True).indices
            pruned = torch.zeros(saliency.numel(), dtype=torch.bool)
            pruned[order[: round(sparsity * saliency.numel())]] = True
            pruned = pruned.reshape(saliency.shape)
        for i in range(i1, i2):
            column = int(perm[i])
            if bits is None:
                q = wt[i].clone()
                q[pruned[i - i1]] = 0
            else:
                if column // gs not in grids:  # a group's grid from its current weights
                    grids[column // gs] = _find_params(wt[i : i + gs].t(), bits, False)
                q = _quantize(wt[i], *grids[column // gs])
            error = (wt[i] - q) / hinv[i, i]
            wt[i + 1 : i2].addr_(hinv[i, i + 1 : i2], error, alpha=-1)
            wt[i] = q
            errors[i - i1] = error
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), errors, alpha=-1)
    result = torch.empty_like(wt)
    result[perm] = wt
    return result.t()


def _wanda(w, norms, sparsity):
    """Prune the lowest ``|W_ij| sqrt(norm_j)`` of every row."""
    scores = w.abs().float() * norms.sqrt()[None, :]
    drop = torch.sort(scores, dim=1, stable=True).indices[:, : round(sparsity * w.shape[1])]
    return w.float().scatter(1, drop, 0.0)


def reference(model: LlamaLM, batches, method: str) -> dict[str, torch.Tensor]:
    """The reference compression of ``model`` (in place), block by block; its state dict."""
    model.eval()
    for block in model.model.model.layers:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        inputs = {n: [] for n in linears}
        hooks = [
            m.register_forward_pre_hook(lambda m, args, into=inputs[n]: into.append(args[0]))
            for n, m in linears.items()
        ]
        with torch.no_grad():
            for batch in batches:
                model(batch)
        for hook in hooks:
            hook.remove()
        for name, layer in linears.items():
            w = layer.weight.detach()
            if method == "wanda":
                new = _wanda(w, _act_norms(inputs[name]), 0.5)
            elif method == "sparsegpt":
                new = _gptq(w, _hessian(inputs[name]), None, sparsity=0.5)
            elif method == "gptq":
                new = _gptq(w, _hessian(inputs[name]), 4)
            elif method == "gptq_g16":  # grids from the current weights, as the walk reaches them
                new = _gptq(w, _hessian(inputs[name]), 4, group_size=16)
            else:  # gptq with act_order and groups of 16 (grids of the original weights)
                new = _gptq(w, _hessian(inputs[name]), 4, group_size=16, act_order=True)
            layer.weight.data = new.to(w.dtype)
    return model.state_dict()


# --- the test --------------------------------------------------------------------------------

STAGES = {
    "gptq": lambda: GPTQ(bits=4, block_size=BLOCK_SIZE, num_calibration_batches=3),
    "gptq_g16": lambda: GPTQ(
        bits=4, group_size=16, block_size=BLOCK_SIZE, num_calibration_batches=3
    ),
    "gptq_act_order_g16": lambda: GPTQ(
        bits=4, group_size=16, act_order=True, block_size=BLOCK_SIZE, num_calibration_batches=3
    ),
    "sparsegpt": lambda: SparseGPT(sparsity=0.5, block_size=BLOCK_SIZE, num_calibration_batches=3),
    "wanda": lambda: Wanda(sparsity=0.5, num_calibration_batches=3),
}


@pytest.mark.parametrize("method", list(STAGES))
def test_the_compressed_state_dict_equals_the_reference_bit_for_bit(method):
    ours = LlamaLM()
    STAGES[method]().apply(ours, dataloader=_batches())
    expected = reference(LlamaLM(), _batches(), method)
    got = ours.state_dict()
    changed = [k for k in expected if k.endswith("proj.weight")]
    assert len(changed) == 14
    for key, value in expected.items():
        assert torch.equal(got[key], value), (
            f"{key}: {(got[key] != value).sum().item()} of {value.numel()} weights differ"
        )
