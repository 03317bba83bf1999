"""A feature space for any data set: a small CNN trained on the run's reference images (`adadiff-bench
train-extractor`), registered as a feature extractor named after the data's hash (`learned-<sha256[:12]>`).

What it learns: with labels, the classes (cross-entropy); without, a self-supervised task, predicting by
how many quarter turns an image was rotated (Gidaris et al., "Unsupervised Representation Learning by
Predicting Image Rotations", ICLR 2018; only 0 and 180 degrees for non-square images). Either way it is a
classifier, and its 64-d penultimate layer, standardised on the training split, is the feature FID, KID and
precision/recall read, as `digits-cnn`'s is. The Inception Score needs class logits, so a space trained on
rotations provides no IS. Images get a random shift of up to one pixel while training; a fixed seeded 80/20
split gives the held-out accuracy and loss the command prints.

The file holds a state dict and a dict of plain values (the name, the data's SHA-256, the image shape, the
task), so it loads with `torch.load(weights_only=True)` and can run no code. A run names it with
`[metrics] extractor = PATH`; a file trained on other data is refused in one line.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import atomic_torch_save
from ..data import Dataset
from ..errors import UserError
from .classifier import ASSET_PATH, FeaturesAndLogitsExtractor, random_shift

FORMAT = "adadiff-bench feature extractor v1"
FEATURE_DIM = 64
HELDOUT_FRACTION = 0.2
MIN_IMAGES = 10
ROTATION_CLASSES = 4


def extractor_name(data_sha256: str) -> str:
    """The feature space's name: `learned-` and the first 12 hex digits of the data's SHA-256."""
    return f"learned-{data_sha256[:12]}"


class FeatureCNN(nn.Module):
    """Conv C->32, 2x2 max-pool, conv 32->64, 2x2 max-pool, conv 64->128, global average pool, 64-d ELU features,
    class logits."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.embed = nn.Linear(128, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes, bias=False)  # no bias: also torch-fidelity's logits_unbiased
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The 64-d penultimate activations of uint8 N x C x H x W images (ELU: no dead, constant dimensions)."""
        x = images.float() / 127.5 - 1.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, ceil_mode=True)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, ceil_mode=True)
        return F.elu(self.embed(F.relu(self.conv3(x)).mean(dim=(2, 3))))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The standardised features FID, KID and precision/recall read."""
        return (self.embedding(images) - self.feature_mean) / self.feature_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(images))


def rotated(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image turned by a random number of quarter turns (half turns when not square), and that number."""
    square = images.shape[-1] == images.shape[-2]
    turns = torch.randint(0, ROTATION_CLASSES, (len(images),), generator=generator)
    turns = turns if square else 2 * (turns % 2)
    out = torch.stack([torch.rot90(image, int(k), dims=(-2, -1)) for image, k in zip(images, turns)])
    return out, turns


def task_batch(images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator):
    """Inputs and targets of one step: the labels, or the rotation applied."""
    return (images, labels) if labels is not None else rotated(images, generator)


def heldout_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random 80/20 (train, held-out) split of `count` indices."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    heldout = max(2, round(HELDOUT_FRACTION * count))
    return order[heldout:], order[:heldout]


@torch.no_grad()
def evaluate(model: FeatureCNN, images: torch.Tensor, labels: torch.Tensor | None, seed: int) -> tuple[float, float]:
    """Held-out accuracy and cross-entropy (rotations: every image at every turn, so the task is fixed)."""
    model.eval()
    if labels is None:
        turns = range(ROTATION_CLASSES) if images.shape[-1] == images.shape[-2] else (0, 2)
        images = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in turns])
        labels = torch.cat([torch.full((len(images) // len(turns),), k) for k in turns])
    logits = model(images)
    return float((logits.argmax(dim=1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def train_extractor(data: Dataset, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
                    seed: int = 0) -> tuple[FeatureCNN, dict]:
    """Train the feature network on `data` deterministically; return it (eval mode) and its meta dict."""
    if len(data.images) < MIN_IMAGES:
        raise UserError(f"data set {data.name!r} holds {len(data.images)} images; train-extractor needs at least "
                        f"{MIN_IMAGES} (a fifth is held out); use a larger data set")
    labels = data.labels if data.labels is not None and data.num_classes > 1 else None
    train, heldout = heldout_split(len(data.images), seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = FeatureCNN(data.images.shape[1], data.num_classes if labels is not None else ROTATION_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (min(batch_size, len(train)),), generator=generator)]
        inputs, targets = task_batch(random_shift(data.images[batch], generator),
                                     None if labels is None else labels[batch], generator)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():  # standardise each feature dimension on the training split
        embedding = model.embedding(data.images[train])
        model.feature_mean.copy_(embedding.mean(dim=0))
        model.feature_std.copy_(embedding.std(dim=0).clamp_min(1e-6))
    accuracy, loss = evaluate(model, data.images[heldout], None if labels is None else labels[heldout], seed)
    _, channels, height, width = data.images.shape
    meta = {"format": FORMAT, "name": extractor_name(data.sha256), "data_sha256": data.sha256, "data_name": data.name,
            "channels": channels, "height": height, "width": width, "num_classes": model.head.out_features,
            "task": "classes" if labels is not None else "rotation", "heldout_accuracy": accuracy,
            "heldout_loss": loss, "heldout_images": len(heldout), "steps": steps, "seed": seed}
    return model, meta


def default_output(data: Dataset) -> Path:
    """Where the command writes by default: extractors/<name>.pt under the working directory."""
    return Path("extractors") / f"{extractor_name(data.sha256)}.pt"


def check_output(path: Path, overwrite: bool) -> None:
    """Never the packaged asset; an existing file only with --overwrite."""
    if path.resolve() == ASSET_PATH.resolve() or path.resolve().parent == ASSET_PATH.resolve().parent:
        raise UserError(f"train-extractor never writes into the installed package ({ASSET_PATH.parent}); "
                        "pass another --out PATH")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it, or another --out PATH")


def main_train_extractor(data: Dataset, out: str | Path | None, steps: int, seed: int, overwrite: bool) -> Path:
    """Train, save atomically, and print the config line and, last, the held-out accuracy and loss."""
    path = Path(out) if out else default_output(data)
    check_output(path, overwrite)
    started = time.perf_counter()
    model, meta = train_extractor(data, steps=steps, seed=seed)
    atomic_torch_save({"state_dict": model.state_dict(), "meta": meta}, path)
    task = "classes" if meta["task"] == "classes" else "rotation (self-supervised, no labels)"
    print(f"feature space {meta['name']} trained on {data.name} ({len(data.images)} images, task: {task}) in "
          f"{time.perf_counter() - started:.1f} s; saved {path}")
    print(f"use it in a run config: [metrics] extractor = \"{path}\"")
    print(f"{meta['name']} held-out accuracy {meta['heldout_accuracy']:.4f}, loss {meta['heldout_loss']:.4f} "
          f"({meta['heldout_images']} held-out images)")
    return path


# ---- reading a trained extractor: safely, and only for the data it was trained on ---------------------------

def read_extractor_file(path: str | Path) -> dict:
    """The saved dict, loaded weights-only (a pickle cannot run); a one-line UserError for anything else."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"feature extractor file {str(path)!r} does not exist; train one with `adadiff-bench "
                        "train-extractor --config RUN.toml` and set [metrics] extractor to the file it writes") from None
    except Exception as exc:  # (an UnpicklingError for pickled objects, a damaged zip, a folder)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"feature extractor file {str(path)!r} is not a file of plain tensors ({reason[:160]}); "
                        "train it again with `adadiff-bench train-extractor`") from None
    meta = saved.get("meta") if isinstance(saved, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(saved.get("state_dict"), dict):
        raise UserError(f"feature extractor file {str(path)!r} was not written by `adadiff-bench train-extractor`; "
                        "train one with it")
    return saved


def load_extractor(path: str | Path) -> tuple[FeatureCNN, dict]:
    """The trained network (eval mode, frozen) and its meta dict."""
    saved = read_extractor_file(path)
    meta = saved["meta"]
    model = FeatureCNN(meta["channels"], meta["num_classes"])
    model.load_state_dict(saved["state_dict"])
    return model.requires_grad_(False).eval(), meta


def check_trained_on(path: str | Path, data: Dataset, where: str = "") -> dict:
    """The file's meta dict when it was trained on exactly `data`; otherwise one line naming both hashes."""
    meta = read_extractor_file(path)["meta"]
    if meta["data_sha256"] != data.sha256:
        raise UserError(f"{where + ': ' if where else ''}[metrics] extractor {str(path)!r} was trained on data "
                        f"{meta['data_sha256'][:12]}, but this run's data {data.name!r} is {data.sha256[:12]}; "
                        "train one for this data with `adadiff-bench train-extractor --config RUN.toml`")
    return meta


class LearnedExtractor(FeaturesAndLogitsExtractor):
    """torch-fidelity feature extractor for a trained file: "features" (64-d) and "logits_unbiased"."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.network, self.meta = load_extractor(feature_extractor_weights_path)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Requested features, in the requested order, of uint8 N x C x H x W images of the trained shape."""
        expected = (self.meta["channels"], self.meta["height"], self.meta["width"])
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.meta['name']} reads uint8 N x {' x '.join(map(str, expected))} images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        embedding = self.network.embedding(images)
        standardised = (embedding - self.network.feature_mean) / self.network.feature_std
        return self.provided(standardised, self.network.head(embedding))

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def feature_roles(meta: dict) -> tuple[str, ...]:
    """The metrics' feature roles the space provides: no Inception Score for a space trained on rotations."""
    return ("fid", "isc", "kid", "prc") if meta["task"] == "classes" else ("fid", "kid", "prc")

