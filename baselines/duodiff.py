"""`duodiff`: a shallow U-ViT for the first, noisy sampling steps, the full model after the switch (Gallo
Fernández, Matişan, Monroy Muñoz, Vasilcoiu, Partyka, Hadži Veljković, Jazbec, "DuoDiff: Accelerating
Diffusion Models with a Dual-Backbone Approach", arXiv 2410.09633, 2024).

DuoDiff starts from what AdaDiff's exits show: early exits happen at the first, noisy sampling steps, then
abruptly the full depth is used. So it replaces the per-step decision by a fixed switch at timestep t_s:
steps with t > t_s run a separately trained shallow U-ViT, steps with t <= t_s the full one. Nothing is
decided per sample; it is a function of t only, the same for every sample of a step.

On U-ViT: the full model is the run's base model; the shallow one is a plain U-ViT with the same width and
patching but few blocks (the authors' shallow configs have 3: one in-block, the mid-block, one out-block).
`configs/duodiff_shallow_digits.toml` trains it from scratch with L_simple on all timesteps, as the
authors' training script does for both backbones. Its long skips are its own. Costs: a shallow step runs
none of the base model's blocks and logs the shallow model's embed + blocks + head (fvcore) with
`add_macs`; a full step logs the whole base model. On DiT (the authors' second backbone) the shallow model
is a DiT of few blocks, trained the same way from a `[dit]` table.

Knobs: `t_switch` (t_s, a timestep on the training scale 0..1000: the shallow model serves t > t_switch;
1000 = `full`, 0 = shallow everywhere but t = 0) and `shallow` (the shallow checkpoint; default the shipped
digits one). Differs from the paper: nothing in the rule; the shallow model here is trained for a few
thousand steps on CPU, far shorter than the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adadiff_bench.checkpoints import BACKBONE_FORMATS, cached_checkpoint
from adadiff_bench.device import rows_on
from adadiff_bench.diffusion import NUM_TRAIN_TIMESTEPS
from adadiff_bench.errors import UserError
from adadiff_bench.knobs import knob
from adadiff_bench.flops import unit_costs
from adadiff_bench.methods.registry import Method, register_method


DEFAULT_SHALLOW = "checkpoints/duodiff_shallow_digits.pt"


@dataclass
class DuoDiffParams:
    t_switch: float = knob(500.0, "t_s on the training scale: the shallow model serves t > t_switch, the full one "
                                  "t <= t_switch (1000 = `full`)", at_least=0,
                           at_most=NUM_TRAIN_TIMESTEPS)
    shallow: str = knob(DEFAULT_SHALLOW, "the shallow model's checkpoint (a backbone of the run's kind)",
                        valid="an existing U-ViT or DiT checkpoint of the run's kind, width and patching")

    def validate(self, where: str) -> None:
        if not 0 <= self.t_switch <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"{where}: t_switch must be a timestep in [0, {NUM_TRAIN_TIMESTEPS}] (the shallow model "
                            f"serves t > t_switch), got {self.t_switch}")
        if not Path(self.shallow).is_file():
            raise UserError(f"{where}: shallow checkpoint {self.shallow!r} not found; train it with `adadiff-bench "
                            "train --config configs/duodiff_shallow_digits.toml` or fix the path")


def shallow_model(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, float]:
    """The shallow model on `device` and its MACs per image for one evaluation (embed + blocks + head), counted
    on its CPU copy (fvcore traces on the CPU)."""
    return cached_checkpoint(path, BACKBONE_FORMATS, device=device), unit_costs(cached_checkpoint(path, BACKBONE_FORMATS)).full


@register_method
class DuoDiff(Method):
    name = "duodiff"
    family = "layer-dropping"
    Params = DuoDiffParams
    trained_files = ("shallow",)  # the second model is trained: its budget shows beside the backbone's
    reads = BACKBONE_FORMATS  # the shallow model (a U-ViT or a DiT), trained from scratch by a plain training config

    @classmethod
    def check(cls, params, model, where):
        shallow, _ = shallow_model(params.shallow)
        made, wanted = (shallow.in_chans, shallow.img_size, shallow.num_classes), \
            (model.in_chans, model.img_size, model.num_classes)
        if made != wanted:
            raise UserError(f"{where}: shallow checkpoint {params.shallow!r} has (channels, image size, classes) = "
                            f"{made}, the run's model {wanted}; train the shallow model on the same data")

    def __init__(self, model, params=None):
        super().__init__(model, params)
        self.shallow, self.shallow_macs = shallow_model(self.params.shallow, self.device)

    def __call__(self, x, t, y, ctx):
        noisy = t.cpu() > self.params.t_switch  # (host) the first, noisy steps go to the shallow model
        if noisy.all() or not noisy.any():  # while sampling, every sample of a step shares t: one network
            return self.evaluate(bool(noisy[0]), x, t, y, None)
        eps = None
        for use_shallow in (True, False):
            rows = torch.nonzero(noisy == use_shallow).squeeze(1)
            index = rows_on(rows, x.device)
            out = self.evaluate(use_shallow, x[index], t[index], None if y is None else y[index], rows)
            eps = torch.empty(x.shape, dtype=out.dtype, device=x.device) if eps is None else eps
            eps[index] = out.to(eps.dtype)
        return eps

    def evaluate(self, use_shallow: bool, x, t, y, rows: torch.Tensor | None) -> torch.Tensor:
        """eps of the shallow or the full model for batch rows `rows` (host; None = all), logged."""
        if use_shallow:
            self.log.add_macs(self.shallow_macs, rows)
            return self.shallow(x, t, y)
        self.log.ran_full(rows)
        return self.model(x, t, y)
