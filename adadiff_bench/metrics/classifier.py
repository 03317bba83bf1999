"""A small CNN for the 8x8 digits, trained here and used as the `digits-cnn` torch-fidelity feature extractor.

Inception-V3 sees an 8x8 digit as a 299x299 blur, so its statistics say little about this data set.
The classifier below is trained on the digits themselves; its 64-d penultimate layer feeds FID/KID and
its logits feed the Inception Score, exactly as Inception's pool and logit layers do for photographs.

Retrain and ship the weights with `main_train_classifier()` (about 15 s on one CPU thread).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..checkpoints import atomic_torch_save
from ..config import DataConfig
from ..data import load_dataset

EXTRACTOR_NAME = "digits-cnn"
ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_cnn.pt"
FEATURE_DIM = 64
NUM_CLASSES = 10
IMAGE_SIZE = 8
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """Conv 1->32->64, 2x2 max-pool, conv 64->128, global average pool, 64-d ELU features, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.embed = nn.Linear(128, FEATURE_DIM)
        # No bias: the logits are then also torch-fidelity's "logits_unbiased", with no second meaning.
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES, bias=False)
        # Training-split statistics of the embedding, so that every feature dimension has unit scale.
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate activations of uint8 N x 1 x 8 x 8 images."""
        x = images.float() / 127.5 - 1.0
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x)).mean(dim=(2, 3))
        # ELU rather than ReLU: dead ReLU units would leave zero-variance feature dimensions (singular FID covariances).
        return F.elu(self.embed(x))

    def standardise(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embedding -> metric features: each dimension shifted and scaled by its training-split mean and std."""
        return (embedding - self.feature_mean) / self.feature_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The standardised 64-d features of uint8 N x 1 x 8 x 8 images (read by FID and KID)."""
        return self.standardise(self.embedding(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of uint8 N x 1 x 8 x 8 images."""
        return self.head(self.embedding(images))

    @torch.no_grad()
    def fit_feature_scale(self, images: torch.Tensor) -> None:
        """Set the feature mean and std from `images` (the training split)."""
        embedding = self.embedding(images)
        self.feature_mean.copy_(embedding.mean(dim=0))
        self.feature_std.copy_(embedding.std(dim=0).clamp_min(1e-6))


def heldout_split(labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 (train, held-out) index split of the digits."""
    from sklearn.model_selection import train_test_split
    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=HELDOUT_FRACTION, stratify=labels.numpy(), random_state=SPLIT_SEED)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by -1, 0 or +1 pixel along each axis, filling with background (zeros)."""
    n, _, height, width = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    offset_y, offset_x = torch.randint(0, 3, (2, n), generator=generator)
    rows = (offset_y[:, None] + torch.arange(height))[:, None, :, None]
    cols = (offset_x[:, None] + torch.arange(width))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose arg-max logit is the label."""
    model.eval()
    return float((model(images).argmax(dim=1) == labels).float().mean())


def train_digits_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64,
                            lr: float = 1e-2) -> tuple[DigitsCNN, float]:
    """Train the CNN deterministically on the fixed training split; return it and its held-out accuracy."""
    data = load_dataset(DataConfig())
    train_idx, heldout_idx = heldout_split(data.labels)
    images, labels = data.images[train_idx], data.labels[train_idx]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(random_shift(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.fit_feature_scale(images)
    return model, accuracy(model, data.images[heldout_idx], data.labels[heldout_idx])


def save_classifier(model: DigitsCNN, heldout_accuracy: float, out_path: str | Path) -> None:
    """Write the state dict and a small meta dict (accuracy, split seed, feature dim)."""
    meta = {"heldout_accuracy": heldout_accuracy, "split_seed": SPLIT_SEED,
            "heldout_fraction": HELDOUT_FRACTION, "feature_dim": FEATURE_DIM}
    atomic_torch_save({"state_dict": model.state_dict(), "meta": meta}, out_path)  # (a kill leaves the old file)


def load_classifier(path: str | Path = ASSET_PATH) -> tuple[DigitsCNN, dict]:
    """Load a saved classifier (eval mode) and its meta dict."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(saved["state_dict"])
    model.requires_grad_(False)
    return model.eval(), saved["meta"]


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file (hashed once per file version)."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def main_train_classifier(out_path: str | Path) -> float:
    """Train the classifier, save it to `out_path` (the packaged asset only when passed `ASSET_PATH`) and print its
    held-out accuracy."""
    out_path = Path(out_path)
    torch.set_num_threads(1)
    model, heldout_accuracy = train_digits_classifier()
    save_classifier(model, heldout_accuracy, out_path)
    print(f"digits-cnn held-out accuracy {heldout_accuracy:.4f}; saved {out_path} "
          f"({Path(out_path).stat().st_size / 1024:.0f} KiB)")
    return heldout_accuracy


class FeaturesAndLogitsExtractor(FeatureExtractorBase):
    """What the suite's small CNN feature spaces share as torch-fidelity extractors: standardised 64-d "features"
    for FID, KID and precision/recall, "logits_unbiased" for the Inception Score; too small for torch.compile."""

    def provided(self, features: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The requested features, in the requested order."""
        by_name = {"features": features, "logits_unbiased": logits}
        return tuple(by_name[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        """Names of the features this extractor can return."""
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        """Logits for the Inception Score, 64-d features for everything else."""
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        """Too small to gain from torch.compile."""
        return False


class DigitsCNNExtractor(FeaturesAndLogitsExtractor):
    """torch-fidelity feature extractor `digits-cnn`: "features" (64-d) and "logits_unbiased" (10)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier, _ = load_classifier(feature_extractor_weights_path or ASSET_PATH)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Requested features, in the requested order, of uint8 N x C x 8 x 8 images (C = 1 or 3)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"digits-cnn expects uint8 N x 1|3 x H x W images, "
                             f"got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"digits-cnn expects {IMAGE_SIZE}x{IMAGE_SIZE} images, got {tuple(images.shape[2:])}")
        if images.shape[1] == 3:
            images = images.float().mean(dim=1, keepdim=True)
        embedding = self.classifier.embedding(images)
        return self.provided(self.classifier.standardise(embedding), self.classifier.head(embedding))

    @staticmethod
    def get_dummy_input_for_compile():
        """A single blank digit."""
        return torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)


def register_digits_extractor() -> None:
    """Register `digits-cnn` with torch-fidelity (a no-op when already registered)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DigitsCNNExtractor)


register_digits_extractor()
