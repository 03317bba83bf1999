"""Sliced Wasserstein distance over Laplacian-pyramid patches (Karras et al., "Progressive Growing of GANs",
ICLR 2018, appendix D): a distribution metric that needs no trained network, for any size and channel count.

Each image is split into a Laplacian pyramid; from every level, 128 neighbourhoods of 7x7 pixels (all
channels) are taken at random positions per image. Per level, the descriptors are normalised per
channel, and the distance between the two sets of descriptors is the sliced Wasserstein distance: the
exact 1-D Wasserstein-1 distance of their projections on random unit directions, averaged over the
directions (POT's `ot.sliced_wasserstein_distance` with p = 1). The metric is the average over levels.

Where this differs from the paper, and why:
- Pyramid depth. The paper's levels run from the full resolution down to 16x16. Small images have few
  levels, so the smallest level here is 16 px on the shorter side for images of 32 px or more, and
  8 px for smaller images (a 7x7 neighbourhood still has 2x2 positions); a 16x16 image gives levels
  16 and 8, an 8x8 image one level (the image itself). Images under 8 px are not measured.
- Normalisation. The paper normalises each set by its own per-channel mean and std; here both sets are
  normalised by the reference's, so that a shift in brightness or contrast counts, and every cell of a
  run is measured in the same units.
- Projections. 128 unit directions per level by default, drawn from a generator seeded with `[metrics]
  swd_seed` (the paper: 4 repeats of 128; `swd_projections = 512` gives its count at four times the
  cost); patch positions come from generators seeded likewise, the same positions for both sets, so
  identical sets are at distance 0.
- Reference size. A reference larger than the sample set is cut to a seeded random subset of as many
  images as there are samples, as the paper compares equal numbers of real and generated images.
The value is reported unscaled (the paper's tables show it x 10^3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEIGHBOURHOOD = 7            # pixels on a side of each descriptor
PATCHES_PER_IMAGE = 128
PROJECTIONS = 128            # per level (the paper: 4 x 128 = 512; [metrics] swd_projections = 512 for its count)
PROJECTION_CHUNK = 64        # directions projected at once (bounds memory: descriptors x chunk floats)
SMALLEST_LEVEL = 16          # the paper's smallest pyramid level
SMALLEST_LEVEL_SMALL_IMAGES = 8
MIN_IMAGE_SIZE = NEIGHBOURHOOD + 1
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def fits(image_shape: tuple[int, ...]) -> bool:
    """Whether images of shape (..., H, W) are large enough for the SWD's 7x7 neighbourhoods."""
    return min(image_shape[-2:]) >= MIN_IMAGE_SIZE


def pyramid_levels(height: int, width: int) -> int:
    """How many Laplacian levels an H x W image gets (the module docstring says how this adapts the paper)."""
    side = min(height, width)
    if side < MIN_IMAGE_SIZE:
        return 0
    smallest = SMALLEST_LEVEL if side >= 2 * SMALLEST_LEVEL else SMALLEST_LEVEL_SMALL_IMAGES
    levels = 1
    while (side + 1) // 2 >= smallest:  # the next level keeps every second pixel: ceil(side / 2)
        side = (side + 1) // 2
        levels += 1
    return levels


def blur(images: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial filter (the Gaussian of Burt and Adelson's pyramid), mirrored at the edges."""
    channels = images.shape[1]
    kernel = _BINOMIAL.to(images.dtype)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, 5).expand(channels, 1, 1, 5), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 5, 1).expand(channels, 1, 5, 1), groups=channels)


def downsample(images: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every second row and column."""
    return blur(images)[..., ::2, ::2]


def upsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zeros between the pixels up to `size`, then blur with four times the gain (each output sees a quarter)."""
    spread = images.new_zeros(*images.shape[:2], *size)
    spread[..., ::2, ::2] = images
    return 4 * blur(spread)


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first, then the low-pass residual: `levels` tensors in all."""
    bands, gaussian = [], images
    for _ in range(levels - 1):
        smaller = downsample(gaussian)
        bands.append(gaussian - upsample(smaller, tuple(gaussian.shape[-2:])))
        gaussian = smaller
    return bands + [gaussian]


def reconstruct(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The image back from its Laplacian pyramid (the inverse of `laplacian_pyramid`)."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = band + upsample(image, tuple(band.shape[-2:]))
    return image


def patch_positions(count: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of PATCHES_PER_IMAGE neighbourhoods for each of `count` images (count x 128 each)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, height - NEIGHBOURHOOD + 1, (count, PATCHES_PER_IMAGE), generator=generator)
    cols = torch.randint(0, width - NEIGHBOURHOOD + 1, (count, PATCHES_PER_IMAGE), generator=generator)
    return rows, cols


def neighbourhoods(level: torch.Tensor, seed: int) -> torch.Tensor:
    """N x 128 x C x 7 x 7 neighbourhoods of one pyramid level (N x C x H x W) at seeded random positions."""
    count, channels, height, width = level.shape
    rows, cols = patch_positions(count, height, width, seed)
    offsets = torch.arange(NEIGHBOURHOOD)
    row_index = (rows[..., None] + offsets)[:, :, None, :, None]
    col_index = (cols[..., None] + offsets)[:, :, None, None, :]
    image_index = torch.arange(count)[:, None, None, None, None]
    channel_index = torch.arange(channels)[None, None, :, None, None]
    return level[image_index, channel_index, row_index, col_index]


def normalised_descriptors(patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Patches minus the per-channel mean, over the per-channel std, one flat row per patch."""
    shape = (1, 1, -1, 1, 1)
    return ((patches - mean.view(shape)) / std.view(shape)).flatten(2).flatten(0, 1)


def channel_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of N x P x C x 7 x 7 patches (a flat channel gets std 1)."""
    per_channel = patches.transpose(0, 2).flatten(1)
    std = per_channel.std(dim=1)
    return per_channel.mean(dim=1), torch.where(std > 0, std, torch.ones_like(std))


def random_directions(dimension: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` directions uniform on the unit sphere of R^dimension, as the columns of a dimension x count matrix."""
    directions = torch.randn(dimension, count, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=0, keepdim=True)


def sliced_wasserstein(source: torch.Tensor, target: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over `directions` of the 1-D Wasserstein-1 distance of the projected sets, by POT, a chunk at a time."""
    import ot
    total, source, target = 0.0, source.numpy(), target.numpy()  # (POT's NumPy backend is the faster one on the CPU)
    for chunk in directions.split(PROJECTION_CHUNK, dim=1):
        mean_over_chunk = ot.sliced_wasserstein_distance(source, target, p=1,
                                                         projections=chunk.numpy().astype(source.dtype))
        total += float(mean_over_chunk) * chunk.shape[1]  # p = 1: the chunk's mean, weighted back to a sum
    return total / directions.shape[1]


def swd_per_level(samples: torch.Tensor, reference: torch.Tensor, seed: int = 0,
                  projections: int = PROJECTIONS) -> list[float]:
    """The sliced Wasserstein distance of each pyramid level (finest first) between two N x C x H x W image sets."""
    levels = pyramid_levels(*samples.shape[-2:])
    if levels == 0 or samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"SWD needs two sets of images of one shape, at least {MIN_IMAGE_SIZE} px on a side "
                         f"(got {tuple(samples.shape[1:])} and {tuple(reference.shape[1:])})")
    generator = torch.Generator().manual_seed(seed)
    pyramids = laplacian_pyramid(samples.double(), levels), laplacian_pyramid(reference.double(), levels)
    distances = []
    for index, (sample_level, reference_level) in enumerate(zip(*pyramids)):
        reference_patches = neighbourhoods(reference_level, seed + index)
        mean, std = channel_statistics(reference_patches)
        source = normalised_descriptors(neighbourhoods(sample_level, seed + index), mean, std).float()
        target = normalised_descriptors(reference_patches, mean, std).float()
        distances.append(sliced_wasserstein(source, target, random_directions(source.shape[1], projections,
                                                                               generator)))
    return distances


def reference_subset(reference: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """As many reference images as there are samples (a seeded random subset) when the reference is larger."""
    if len(reference) <= count:
        return reference
    chosen = torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))[:count]
    return reference[chosen.sort().values]


def sliced_wasserstein_patches(samples: torch.Tensor, reference: torch.Tensor, seed: int = 0,
                               projections: int = PROJECTIONS) -> float:
    """The SWD metric: uint8 (or float) N x C x H x W `samples` against `reference`, averaged over pyramid levels.

    A reference larger than the sample set is cut to a seeded random subset of N images (the paper compares
    equal numbers of real and generated images; the cost then grows with N, not with the data set). Pixel
    values are taken as they are (0..255 for uint8 images); the reference's per-channel statistics normalise
    both sets, so the scale of the input does not matter."""
    per_level = swd_per_level(samples, reference_subset(reference, len(samples), seed), seed, projections)
    return sum(per_level) / len(per_level)
