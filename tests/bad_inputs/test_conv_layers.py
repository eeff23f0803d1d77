"""The catalogue, part convolutions and layers no method takes (issue #27: nothing silent).

A new-user probe ran ``MagnitudePruning(sparsity=0.5)`` with default targets on a WaveNet-style
stack of ``nn.Conv1d`` layers: every Conv1d was skipped without a word (not a candidate type)
and the report said sparsity 0.5 and C = 2 over 192 of the model's 480 weights. Here every
method that takes ``nn.Conv2d`` compresses the 1-D (and 3-D) convolutions of modules written
the way their authors write them, checked on the tensors; layers of types no method takes are
named in one warning with their weight counts, and the compression rate counts them as dense.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from ppq_lightning import check_invariants
from ppq_lightning.callbacks import (
    GPTQ,
    CompressionSchedule,
    LoRAFineTune,
    MagnitudePruning,
    RTNQuantization,
    SparseGPT,
    Wanda,
)
from ppq_lightning.compressed.accounting import compression_summary
from ppq_lightning.compressed.state import current_mask, get_state
from ppq_lightning.edits.lora import lora_layers
from ppq_lightning.errors import PPQConfigError
from ppq_lightning.modules.targets import (
    ComputedWeightWarning,
    UntakenLayerWarning,
    resolve_targets,
)
from tests.bad_inputs.helpers import assert_refused, names
from tests.helpers import make_trainer


# -- modules written the way their authors write them -------------------------------------------
class Chomp1d(nn.Module):
    """The TCN's trim of the right padding, which makes a padded convolution causal."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.size].contiguous()


class TemporalBlock(nn.Module):
    """Bai et al.'s TCN block (locuslab/TCN): two dilated causal convolutions, the first under
    ``weight_norm`` as there, and a 1x1 residual projection when the width changes."""

    def __init__(self, n_in: int, n_out: int, kernel: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel - 1) * dilation
        self.conv1 = parametrizations.weight_norm(
            nn.Conv1d(n_in, n_out, kernel, padding=padding, dilation=dilation)
        )
        self.conv2 = nn.Conv1d(n_out, n_out, kernel, padding=padding, dilation=dilation)
        self.net = nn.Sequential(
            self.conv1, Chomp1d(padding), nn.ReLU(), self.conv2, Chomp1d(padding), nn.ReLU()
        )
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.net(x) + res)


class TCN(L.LightningModule):
    """A sequence classifier over a TCN, the way the TCN examples build one."""

    def __init__(self, channels: int = 16, n_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_proj = nn.Conv1d(3, channels, 1)  # the stem
        self.blocks = nn.Sequential(
            TemporalBlock(channels, channels, 3, 1),
            TemporalBlock(channels, 2 * channels, 3, 2),
            TemporalBlock(2 * channels, 2 * channels, 3, 4),
        )
        self.head = nn.Linear(2 * channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.input_proj(x))[:, :, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class AudioClassifier(L.LightningModule):
    """A 1-D keyword-spotting CNN over raw audio (M5-style: strided convolutions, BatchNorm,
    depthwise-separable blocks) with a ``torchmetrics.Accuracy``."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4, padding=4),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 5, stride=2, padding=2),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, groups=32),  # depthwise
            nn.Conv1d(32, 32, 1),  # pointwise
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=2, dilation=2, groups=4),  # grouped
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, n_classes)
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.accuracy(self(x).argmax(-1), y)
        self.log("val_acc", self.accuracy)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def _sequences(channels: int, length: int, n: int = 16, batch: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, length, generator=generator)
    y = torch.randint(0, 4, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _convs(model: nn.Module) -> dict[str, nn.Conv1d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv1d)}


def _rows(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().flatten(1)


# what the default targets take of each model: every Conv1d but the stem and the weight_norm ones
TCN_TAKEN = {
    "blocks.0.conv2",
    "blocks.1.conv2",
    "blocks.1.downsample",
    "blocks.2.conv2",
}
AUDIO_TAKEN = {"features.3", "features.6", "features.7", "features.9"}

SPARSIFIERS = {
    "magnitude": lambda: MagnitudePruning(sparsity=0.5, scope="row"),
    "wanda": lambda: Wanda(sparsity=0.5),
    "sparsegpt": lambda: SparseGPT(sparsity=0.5, num_calibration_batches=2),
}
QUANTIZERS = {
    "rtn": lambda: RTNQuantization(bits=2),
    "gptq": lambda: GPTQ(bits=2, num_calibration_batches=2),
}


def _apply_quietly(stage, model, loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComputedWeightWarning)  # the weight_norm layers
        return stage.apply(model, dataloader=loader)


# -- 1. every method compresses the Conv1d layers ------------------------------------------------
@pytest.mark.parametrize("method", list(SPARSIFIERS))
@pytest.mark.parametrize("make", [TCN, AudioClassifier], ids=["tcn", "audio"])
def test_pruning_zeroes_half_of_every_output_channel_of_the_conv1d_layers(make, method):
    model = make()
    loader = _sequences(3 if make is TCN else 1, 24 if make is TCN else 64)
    _apply_quietly(SPARSIFIERS[method](), model, [x for x, _ in loader])
    taken = TCN_TAKEN if make is TCN else AUDIO_TAKEN
    compressed = {n for n, m in _convs(model).items() if get_state(m) is not None}
    assert compressed == taken
    for name in taken:
        layer = model.get_submodule(name)
        rows = _rows(layer)
        zeros = (rows == 0).float().mean(1)  # per output channel
        if method == "sparsegpt":  # SparseGPT's mask is chosen per block of columns (per group)
            assert abs((rows == 0).float().mean() - 0.5) <= 1 / rows.shape[1] + 1e-6, name
        else:  # half of every output channel, to one weight
            assert torch.all((zeros - 0.5).abs() <= 0.5 / rows.shape[1] + 1e-6), (name, zeros)
        assert torch.equal(rows == 0, ~current_mask(layer).flatten(1)), name  # the real weight
    assert check_invariants(model) == len(taken)
    for name, layer in _convs(model).items():  # the stem and the weight_norm layers: untouched
        if name not in taken:
            assert (layer.weight != 0).all(), name


@pytest.mark.parametrize("method", list(QUANTIZERS))
@pytest.mark.parametrize("make", [TCN, AudioClassifier], ids=["tcn", "audio"])
def test_quantization_puts_every_output_channel_of_the_conv1d_layers_on_four_levels(make, method):
    model = make()
    loader = _sequences(3 if make is TCN else 1, 24 if make is TCN else 64)
    before = {n: m.weight.detach().clone() for n, m in _convs(model).items()}
    _apply_quietly(QUANTIZERS[method](), model, [x for x, _ in loader])
    taken = TCN_TAKEN if make is TCN else AUDIO_TAKEN
    assert {n for n, m in _convs(model).items() if get_state(m) is not None} == taken
    for name in taken:
        layer = model.get_submodule(name)
        state = get_state(layer)
        assert state.bits == 2 and state.scale.shape[0] == layer.out_channels, name
        for row in _rows(layer):  # per output channel: at most 2**bits levels
            assert row.unique().numel() <= 4, name
        assert not torch.equal(layer.weight, before[name]), name
    assert check_invariants(model) == len(taken)


def test_gptq_on_a_conv1d_uses_its_input_patches(tmp_path):
    """GPTQ's Hessian is that of the convolution's patches: its output error on the calibration
    data is below round-to-nearest's on the same grid (a Hessian of the wrong columns, or of
    the unpadded input, would not be)."""
    loader = [x for x, _ in _sequences(1, 64, n=32)]
    gptq, rtn = AudioClassifier(), AudioClassifier()
    GPTQ(bits=2, targets=r"^features\.3$", num_calibration_batches=4).apply(gptq, dataloader=loader)
    RTNQuantization(bits=2, targets=r"^features\.3$").apply(rtn, dataloader=loader)
    reference = AudioClassifier()
    errors = {}
    for name, model in {"gptq": gptq, "rtn": rtn}.items():
        errors[name] = sum(
            (model.features[:4](x) - reference.features[:4](x)).pow(2).sum().item() for x in loader
        )
    assert errors["gptq"] < 0.9 * errors["rtn"]


def test_lora_adapts_the_conv1d_layers(tmp_path):
    model = AudioClassifier()
    loader = _sequences(1, 64)
    # features.6 is depthwise (32 groups, r=4 is no multiple), features.9 dilated (peft's
    # adapter has no dilation): refused below, left out here
    stage = LoRAFineTune(r=4, alpha=8, ignore=r"^features\.(6|9)$")
    make_trainer(tmp_path, [stage], max_steps=2).fit(model, loader)
    layers = lora_layers(model)
    assert set(layers) == {"features.3", "features.7"}
    for layer in layers.values():
        assert isinstance(layer.get_base_layer(), nn.Conv1d)
        assert isinstance(layer.lora_A["default"], nn.Conv1d)
        assert layer.lora_B["default"].weight.abs().sum() > 0  # trained


def test_lora_refuses_a_grouped_conv1d_whose_groups_do_not_divide_r(tmp_path):
    model = AudioClassifier()
    stage = LoRAFineTune(r=2, targets=r"^features\.6$")
    assert_refused(
        lambda: make_trainer(tmp_path, [stage], max_steps=1).fit(model, _sequences(1, 64)),
        PPQConfigError,
        names("r=2", "features.6", "groups=32"),
        model,
    )


@pytest.mark.parametrize("make", [TCN, AudioClassifier], ids=["tcn", "audio"])
def test_lora_refuses_a_dilated_convolution_before_any_adapter_exists(tmp_path, make):
    """peft builds the adapter of a convolution without its dilation: the first forward of a
    TCN failed inside peft with a shape error. Refused before fit changes anything."""
    model = make()
    loader = _sequences(3, 24) if make is TCN else _sequences(1, 64)
    stage = LoRAFineTune(r=4, ignore=r"^features\.6$")
    dilated = "blocks.1.conv2" if make is TCN else "features.9"
    assert_refused(
        lambda: make_trainer(tmp_path, [stage], max_steps=1).fit(model, loader),
        PPQConfigError,
        names(dilated, "dilation=", "peft", f"ignore={dilated!r}"),
        model,
    )


def test_a_schedule_over_a_tcn_reports_the_conv1d_layers(tmp_path):
    """The probe: P with default targets on the WaveNet-style stack. The schedule's row counts
    the Conv1d layers, and its sparsity is the real one over the layers it counts."""
    model = TCN()
    schedule = CompressionSchedule(stages=[MagnitudePruning(sparsity=0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComputedWeightWarning)
        make_trainer(tmp_path, [schedule]).validate(model, _sequences(3, 24), verbose=False)
    row = schedule.rows()[-1]
    counted = TCN_TAKEN | {"input_proj", "blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"}
    counted -= {"input_proj"}  # the stem stays out by rule
    weights = sum(model.get_submodule(n).weight.numel() for n in counted)
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in TCN_TAKEN)
    assert row["n_layers"] == len(TCN_TAKEN)
    assert row["n_weights"] == weights  # the weight_norm layers count as dense
    assert row["sparsity"] == pytest.approx(zeros / weights)
    assert zeros > 0.2 * weights


@pytest.mark.parametrize("method", ["wanda", "gptq"])
def test_conv3d_layers_are_compressed_too(method):
    """A tiny video classifier (3-D convolutions): the same windows, three kernel dimensions."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.ReLU(),
        nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0), groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    loader = [torch.randn(2, 3, 4, 8, 8) for _ in range(2)]
    stage = Wanda(sparsity=0.5) if method == "wanda" else GPTQ(bits=2, num_calibration_batches=2)
    stage.apply(model, dataloader=loader)
    for index in (2, 4):
        rows = _rows(model[index])
        if method == "wanda":
            assert torch.all((rows == 0).float().mean(1) == 0.5)
        else:
            assert all(row.unique().numel() <= 4 for row in rows)
    assert get_state(model[0]) is None and get_state(model[8]) is None  # stem and head
    assert check_invariants(model) == 2


def test_a_conv1d_with_same_padding_is_refused_by_calibrated_methods_before_anything_changes():
    """``padding="same"`` (common in audio) is not reproduced by the patches: refused, naming
    the layer type and the fix, with no weight changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 5, padding="same"))
    loader = [torch.randn(2, 2, 16)]
    assert_refused(
        lambda: GPTQ(bits=4, targets=r"^2$").apply(model, dataloader=loader),
        PPQConfigError,
        names("Conv1d", "padding='same'", "ignore"),
        model,
    )


# -- 2. layers no method takes: one warning, and counted as dense -------------------------------
class Demucs(nn.Module):
    """A Demucs-style waveform enhancer: a Conv1d encoder, an LSTM, a ConvTranspose1d decoder
    (of types no method takes), and a user's own gain layer holding a ``weight`` Parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Conv1d(1, 8, 8, stride=4), nn.ReLU(), nn.Conv1d(8, 16, 1), nn.GLU(1)
        )
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.mix = ChannelMix(8)
        self.decoder = nn.Sequential(nn.Conv1d(8, 16, 1), nn.GLU(1), nn.ConvTranspose1d(8, 1, 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        z = self.lstm(z.transpose(1, 2))[0].transpose(1, 2)
        return self.decoder(self.mix(z))


class ChannelMix(nn.Module):
    """A user's layer: a channel-mixing matrix as a plain ``weight`` Parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) + 0.1 * torch.randn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bct->bot", self.weight, x)


UNTAKEN = {"lstm": 2 * 4 * 8 * 8, "mix": 64, "decoder.2": 8 * 1 * 8}


def _untaken_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UntakenLayerWarning)]


def test_layers_no_method_takes_are_named_in_one_warning_with_their_weight_counts():
    model = Demucs()
    loader = [torch.randn(2, 1, 64) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MagnitudePruning(sparsity=0.5).apply(model, dataloader=loader)
        RTNQuantization(bits=4).apply(model, dataloader=loader)  # the same layers: no repeat
    messages = _untaken_warnings(caught)
    assert len(messages) == 1, messages
    for name, count in UNTAKEN.items():
        assert name in messages[0] and f"{count:,} weights" in messages[0], name
    assert "LSTM" in messages[0] and "ConvTranspose1d" in messages[0]
    assert "ChannelMix" in messages[0] and "dense" in messages[0]
    assert get_state(model.encoder[2]) is not None  # the Conv1d layers are compressed


def test_the_compression_rate_counts_the_layers_no_method_takes_as_dense():
    model = Demucs()
    loader = [torch.randn(2, 1, 64) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntakenLayerWarning)
        MagnitudePruning(sparsity=0.5).apply(model, dataloader=loader)
    summary = compression_summary(model)
    taken = {"encoder.2", "decoder.0"}  # encoder.0 is the stem
    assert {n for n, m in model.named_modules() if get_state(m) is not None} == taken
    taken_weights = sum(model.get_submodule(n).weight.numel() for n in taken)
    assert summary.n_weights == taken_weights + sum(UNTAKEN.values())
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in taken)
    assert summary.sparsity == pytest.approx(zeros / summary.n_weights)
    assert summary.nominal_C == pytest.approx(
        summary.n_weights / (taken_weights / 2 + sum(UNTAKEN.values()))
    )


def test_ignore_silences_the_warning_and_explicit_targets_never_warn():
    model = Demucs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_targets(model, ignore=r"^(lstm|mix|decoder\.2)$")
        resolve_targets(Demucs(), targets=r"encoder")
    assert _untaken_warnings(caught) == []


def test_an_embedding_looking_up_computed_indices_is_named_an_input_embedding_is_not():
    """A VQ bottleneck's codebook (indices from another layer) is a layer no method takes; the
    token embedding reading the model's input is left out by rule, quietly."""

    class VQ(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.tokens = nn.Embedding(10, 8)
            self.encode = nn.Linear(8, 8)
            self.hidden = nn.Linear(8, 8)
            self.codebook = nn.Embedding(8, 8)
            self.decode = nn.Linear(8, 10)
            self.example_input_array = torch.randint(0, 10, (2, 5))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.hidden(self.encode(self.tokens(ids)))
            return self.decode(self.codebook(h.argmax(-1)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = resolve_targets(VQ())
    assert set(chosen) == {"encode", "hidden"}  # decode is the output layer
    messages = _untaken_warnings(caught)
    assert len(messages) == 1 and "codebook (Embedding, 64 weights)" in messages[0]
    assert "tokens" not in messages[0]


# -- exports of compressed Conv1d layers --------------------------------------------------------
def _pruned_and_quantized_audio_classifier() -> AudioClassifier:
    model = AudioClassifier()
    loader = [x for x, _ in _sequences(1, 64)]
    SparseGPT(sparsity=0.5, num_calibration_batches=2).apply(model, dataloader=loader)
    GPTQ(bits=4, num_calibration_batches=2).apply(model, dataloader=loader)
    return model


def test_the_native_export_reloads_compressed_conv1d_layers_bit_for_bit(tmp_path):
    from ppq_lightning.export import export, load_compressed

    model = _pruned_and_quantized_audio_classifier()
    export(model, "ppq", tmp_path / "audio")
    loaded = load_compressed(tmp_path / "audio", AudioClassifier())
    for name in AUDIO_TAKEN:
        layer, again = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(layer.weight, again.weight), name
        assert torch.equal(current_mask(layer), current_mask(again)), name
        assert get_state(again).bits == 4, name
    x = next(iter(_sequences(1, 64)))[0]
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_the_export_counts_the_dense_layers_c_counts(tmp_path):
    """C counts the layers no method takes as dense; export.json's file size of the counted
    layers (and its file_C) left their bytes out, so file_C and measured_C were over
    different weights."""
    from safetensors import safe_open

    from ppq_lightning.compressed.accounting import counted_layers
    from ppq_lightning.export import export
    from ppq_lightning.export.folder import counted_bytes
    from ppq_lightning.export.native import STORED_PARTS, WEIGHTS

    model = Demucs()
    loader = [torch.randn(2, 1, 64) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntakenLayerWarning)
        MagnitudePruning(sparsity=0.5).apply(model, dataloader=loader)
    manifest = export(model, "ppq", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / WEIGHTS), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    compressible = counted_bytes(tensors, list(counted_layers(model)), STORED_PARTS)
    assert manifest["counted_layer_bytes"] == compressible + 4 * sum(UNTAKEN.values())
    assert manifest["counted_layers"] == len(counted_layers(model)) + len(UNTAKEN)
