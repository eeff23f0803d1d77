"""LightningModules written the way their authors write them, nobody here.

Each is what a user brings: Lightning's own demo modules as shipped, an HF causal LM inside a
plain LightningModule with ``forward(**batch)``, timm and torchvision ResNets with a torchmetrics
accuracy that log and return nothing, and a torchvision ViT (``nn.MultiheadAttention``). Sizes
are tiny; the code shapes are the authors'. Nothing here knows about ppq-lightning.
"""

from __future__ import annotations

import lightning as L
import timm
import torch
import torchmetrics
import torchvision
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
SEQ = 16
CLASSES = 10


class TokenPairs(Dataset):
    """The demo Transformer's data shape: (inputs, target) token windows, target shifted by one."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


class OfflineTransformer(LightningTransformer):
    """Lightning's demo ``LightningTransformer`` as shipped, but for ``prepare_data``, which
    downloads WikiText2 (this machine is offline; the data is passed to ``fit`` instead)."""

    def prepare_data(self) -> None:
        pass


def demo_transformer() -> LightningTransformer:
    """Lightning's demo ``LightningTransformer`` (``nn.Transformer``: eight
    ``nn.MultiheadAttention``), with a small vocabulary instead of WikiText2's."""
    torch.manual_seed(0)
    return OfflineTransformer(vocab_size=VOCAB)


def token_pairs(n: int = 16, seed: int = 0, batch_size: int = 4) -> DataLoader:
    return DataLoader(TokenPairs(n, seed), batch_size=batch_size)


class UserCausalLM(L.LightningModule):
    """A user's module around an HF causal LM: batches are the tokenizer's dicts."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        loss = self(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(**batch).loss
        self.log("val_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TokenDicts(Dataset):
    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def token_dicts(n: int = 16, seed: int = 0, batch_size: int = 4) -> DataLoader:
    return DataLoader(TokenDicts(n, seed), batch_size=batch_size)


class UserClassifier(L.LightningModule):
    """A user's image classifier: a timm or torchvision net, torchmetrics accuracy, logs only."""

    def __init__(self, arch: str = "torchvision_resnet18", lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        if arch == "torchvision_resnet18":
            self.net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
        elif arch == "timm_resnet10t":
            self.net = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
        elif arch == "torchvision_vit":
            self.net = torchvision.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=2,
                num_heads=2,
                hidden_dim=32,
                mlp_dim=64,
                num_classes=CLASSES,
            )
            # stands in for pretrained weights: torchvision zero-initialises a new head, and a
            # frozen zero head passes no gradient to the adapters before it
            nn.init.normal_(self.net.heads.head.weight, std=0.02)
        else:
            raise ValueError(arch)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=CLASSES)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def images(n: int = 32, seed: int = 0, batch_size: int = 8) -> DataLoader:
    """Random 32x32 images whose label is readable off the mean of a colour channel, so that
    accuracy differs between a good and a damaged model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) * 40).long().clamp(-5, 4) + 5
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def boring_model() -> BoringModel:
    """Lightning's ``BoringModel`` as shipped (one ``nn.Linear(32, 2)``, its own loaders)."""
    torch.manual_seed(0)
    return BoringModel()


def accuracy_of(module: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy recomputed from scratch, outside Lightning and the module's metrics."""
    module.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((module(x).argmax(-1) == y).sum())
            total += len(y)
    return right / total
