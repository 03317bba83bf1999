"""Which convention do papers' "GFLOPs" use? Our MAC count of a published configuration beside its paper figure.

U-ViT (Bao et al., CVPR 2023) reports 133 GFLOPs and 501 M parameters for U-ViT-H/2 on ImageNet 256
(latents 32x32x4, patch 2, width 1152, depth 28, 16 heads, 1,001 class labels). This script builds
that network with random weights and counts it exactly as the harness does (fvcore, attention
included, norms not counted). If our MACs match the paper's GFLOPs, the paper's unit is MACs, and
its numbers compare with `macs_per_image` (= `gflops_per_image` / 2).

    python benchmarks/paper_flop_conventions.py      # about 30 s, 2 GB of memory
"""
from __future__ import annotations

import torch

from adadiff_bench.checkpoints import build_model
from adadiff_bench.config import UViTConfig
from adadiff_bench.flops import unit_costs

UVIT_H2_IMAGENET256 = UViTConfig(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                                 num_classes=1001)
PAPER_GFLOPS, PAPER_PARAMS_M = 133, 501


def main() -> None:
    torch.set_num_threads(2)
    with torch.no_grad():
        model = build_model(UVIT_H2_IMAGENET256).eval()
    macs = unit_costs(model).full
    params = sum(p.numel() for p in model.parameters())
    print("| network | paper: params, GFLOPs | ours: params, G MACs | ours: G FLOPs (2 x MACs) |")
    print("|---|---:|---:|---:|")
    print(f"| U-ViT-H/2, ImageNet 256 | {PAPER_PARAMS_M} M, {PAPER_GFLOPS} | {params / 1e6:.1f} M, {macs / 1e9:.1f} | "
          f"{2 * macs / 1e9:.1f} |")


if __name__ == "__main__":
    main()
