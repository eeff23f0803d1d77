"""An order study, a schedule with per-stage evaluation, and export → reload, on users' own
modules: the metrics are what the module logs, and the exported model is the compressed one."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ppq_lightning.callbacks import CompressionSchedule, RTNQuantization, Wanda
from ppq_lightning.export import export, load_compressed
from ppq_lightning.study.engine import OrderStudy
from tests.user_modules import modules


def image_data() -> L.LightningDataModule:
    """The user's data as a datamodule, the way Lightning builds one from datasets."""
    loader = modules.images()
    return L.LightningDataModule.from_datasets(
        train_dataset=loader.dataset, val_dataset=loader.dataset, batch_size=8
    )


def test_an_order_study_compares_the_accuracy_the_module_logs(tmp_path):
    """A study of a user's classifier measures each cell by the ``val_acc`` its torchmetrics
    object logs in ``validate`` (it used to see only a returned loss, which this module has
    not), and its best order is the one with the highest accuracy."""
    module = modules.UserClassifier("timm_resnet10t")
    study = OrderStudy(
        module,
        image_data(),
        stages=[Wanda(sparsity=0.5, name="P"), RTNQuantization(bits=3, name="Q")],
        metric="val_acc",
        higher_is_better=True,
        output_dir=tmp_path / "study",
    )
    result = study.run()
    cells = {cell.order: cell.value for cell in result.cells()}
    assert set(cells) >= {"dense", "P", "Q", "P>Q", "Q>P"}
    best = max(cells["P>Q"], cells["Q>P"])  # orders tied exactly are all named: "P>Q=Q>P"
    assert all(cells[order] == best for order in result.best_order.split("="))
    # the dense cell is a plain validate of the module
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    plain = trainer.validate(module, datamodule=image_data(), verbose=False)[0]["val_acc"]
    assert cells["dense"] == pytest.approx(plain)


@pytest.mark.parametrize("arch", ["torchvision_vit", "timm_resnet10t"])
def test_a_schedule_reports_the_modules_accuracy_after_every_stage(arch, tmp_path):
    """Per-stage evaluation of a user's classifier with dataloaders passed to ``validate``: each
    row holds the ``val_acc`` the module logs, the last row is the compressed model's, and the
    ``validate`` after the stages reports the accuracy of that model, recomputed from scratch."""
    module = modules.UserClassifier(arch)
    schedule = CompressionSchedule(
        stages=[Wanda(sparsity=0.5, name="P"), RTNQuantization(bits=3, name="Q")],
        output_dir=str(tmp_path / "report"),
    )
    trainer = L.Trainer(
        callbacks=[schedule],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    validated = trainer.validate(module, dataloaders=modules.images(), verbose=False)[0]
    rows = {row["stage"]: row for row in schedule.rows()}
    assert list(rows) == ["0_dense", "1_P", "2_Q"]
    assert all("val_acc" in row for row in rows.values())
    recomputed = modules.accuracy_of(module, modules.images())
    assert rows["2_Q"]["val_acc"] == pytest.approx(recomputed)
    assert validated["val_acc"] == pytest.approx(recomputed)


def test_export_and_reload_a_users_compressed_model(tmp_path):
    """A user's ViT (``nn.MultiheadAttention``) compressed by Wanda and RTN exports in the
    native format and reloads into a fresh module with the same weights and outputs."""
    module = modules.UserClassifier("torchvision_vit")
    trainer = L.Trainer(
        callbacks=[Wanda(sparsity=0.5, name="P"), RTNQuantization(bits=4, name="Q")],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=modules.images(), verbose=False)
    export(module, "ppq", tmp_path / "export")
    reloaded = load_compressed(tmp_path / "export", model=modules.UserClassifier("torchvision_vit"))
    ours, theirs = module.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():  # weights bit for bit; records (extra state) equal
        same = torch.equal(value, theirs[key]) if torch.is_tensor(value) else value == theirs[key]
        assert same, key
    x = next(iter(modules.images()))[0]
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), reloaded(x))
