"""Every post-training method through a real Trainer on modules nobody here wrote.

For each (module, method): every matrix the method targets by default is really compressed
(zeros, N:M groups, levels per row read off the tensors, ``nn.MultiheadAttention``'s packed
Q/K/V included), the layers the defaults leave out (output head, classifier, stem) are dense,
the reported compression counts every weight of the compressed matrices, the invariants hold,
and the metric the module logged is a recomputation on the final model.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch

from ppq_lightning import check_invariants, compression_summary
from ppq_lightning.callbacks import GPTQ, RTNQuantization, SparseGPT, Wanda
from ppq_lightning.callbacks import MagnitudePruning as Magnitude
from tests.user_modules import checks, modules

# module -> (factory, loader factory, how the stages fire, the matrices the defaults leave dense)
MODULES = {
    "demo_transformer": (modules.demo_transformer, modules.token_pairs, "fit", {"model.decoder"}),
    "hf_causal_lm": (modules.UserCausalLM, modules.token_dicts, "validate", {"model.lm_head"}),
    "torchvision_resnet18": (
        lambda: modules.UserClassifier("torchvision_resnet18"),
        modules.images,
        "validate",
        {"net.conv1", "net.fc"},
    ),
    "timm_resnet": (
        lambda: modules.UserClassifier("timm_resnet10t"),
        modules.images,
        "validate",
        {"net.conv1.0", "net.fc"},
    ),
    "torchvision_vit": (
        lambda: modules.UserClassifier("torchvision_vit"),
        modules.images,
        "validate",
        {"net.conv_proj", "net.heads.head"},
    ),
}

# method -> (stage factory, what its matrices must show)
CALIBRATION = {"num_calibration_batches": 2}
METHODS = {
    "magnitude": (lambda: Magnitude(sparsity=0.5), ("sparsity", 0.5)),
    "wanda": (lambda: Wanda(sparsity=0.5, **CALIBRATION), ("sparsity", 0.5)),
    "wanda_2:4": (lambda: Wanda(pattern="2:4", **CALIBRATION), ("n:m", (2, 4))),
    "sparsegpt": (lambda: SparseGPT(sparsity=0.5, **CALIBRATION), ("sparsity", 0.5)),
    "rtn": (lambda: RTNQuantization(bits=3), ("bits", 3)),
    "gptq": (lambda: GPTQ(bits=3, **CALIBRATION), ("bits", 3)),
}


def run_stage(module_name: str, stage, tmp_path):
    factory, loader, fires_in, dense = MODULES[module_name]
    model = factory()
    dense_before = {n: m.clone() for n, m in checks.weight_matrices(model).items() if n in dense}
    trainer = L.Trainer(
        callbacks=[stage],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=0,  # fit: the stages fire at fit start; no step changes the weights after
        limit_val_batches=2,
    )
    if fires_in == "fit":
        trainer.fit(model, train_dataloaders=loader())
    else:
        trainer.validate(model, dataloaders=loader(), verbose=False)
    return model, trainer, dense, dense_before


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("module_name", sorted(MODULES))
def test_every_targeted_matrix_is_compressed(module_name, method, tmp_path):
    stage, (kind, value) = METHODS[method]
    model, _, dense, dense_before = run_stage(module_name, stage(), tmp_path)
    matrices = checks.weight_matrices(model)
    targeted = {n: m for n, m in matrices.items() if n not in dense}
    assert any("in_proj_weight" in n for n in targeted) == (
        module_name in {"demo_transformer", "torchvision_vit"}
    )
    for name, matrix in targeted.items():
        if kind == "sparsity":
            assert checks.zero_fraction(matrix) >= value - 0.02, name
        elif kind == "n:m":
            assert checks.is_n_m(matrix, *value), name
        else:
            assert checks.max_levels_per_row(matrix) <= 2**value, name
    for name, before in dense_before.items():  # the defaults leave the head and the stem dense
        assert torch.equal(matrices[name], before), name
    check_invariants(model)
    summary = compression_summary(model)
    assert summary.n_weights == sum(m.numel() for m in targeted.values())
    if kind == "sparsity":  # the reported sparsity is the tensors'
        zeros = sum(int((m == 0).sum()) for m in targeted.values())
        assert summary.sparsity == pytest.approx(zeros / summary.n_weights, abs=1e-6)


@pytest.mark.parametrize("module_name", ["torchvision_resnet18", "timm_resnet", "torchvision_vit"])
def test_logged_accuracy_is_the_final_models(module_name, tmp_path):
    """The ``val_acc`` a user's torchmetrics object logs after compression is the accuracy of
    the compressed model, recomputed outside Lightning."""
    model, trainer, _, _ = run_stage(module_name, Wanda(sparsity=0.5, **CALIBRATION), tmp_path)
    loader = modules.images()
    recomputed = modules.accuracy_of(model, list(itertools.islice(loader, 2)))  # 2 val batches
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(recomputed)
