"""Per-part cost table of a checkpoint: what `adadiff-bench flops` prints.

Network rows, in execution order: `embed` (patch, time and label embedding, position table), every
block, `head` (norm, decoder, final conv). MACs are per image and network evaluation, counted as in
`flops.py` (the unit costs the step log multiplies), FLOPs = 2 x MACs; `share` is a row's MACs over
one full evaluation. Every backbone parameter belongs to exactly one network row.

An AdaDiff checkpoint adds overhead rows with the numbers the `adadiff` method logs: one estimator
call (`Estimator.macs_per_sample`, its parameters = one exit point's estimator), one exit-head call
(the head's unit cost; parameters it adds, 0 when shared with the final head) and the worst case,
the official forward's: an estimator after every block and an exit head after every block but the
last (whose head is the network's own). The `adadiff` method itself calls the estimator at most
after blocks 1..N-1 and one head per evaluation.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from .adadiff_checkpoints import FORMAT as ADADIFF_FORMAT, load_adadiff
from .checkpoints import FORMAT as UVIT_FORMAT, load_model, read_checkpoint
from .errors import UserError
from .flops import unit_costs
from .models.adadiff import AdaDiffUViT, looks_official
from .models.uvit import UViT
from .steplog import UnitCosts

NETWORK, OVERHEAD, WORST_CASE = "network", "overhead", "worst case"
COLUMNS = ["part", "kind", "macs", "flops", "params", "share"]
EMBED_MODULES = ("patch_embed", "time_embed", "label_emb", "pos_embed")
HEAD_MODULES = ("norm", "decoder_pred", "final_layer")


def load_for_flops(path: str | Path) -> tuple[UViT, AdaDiffUViT | None]:
    """(U-ViT backbone, AdaDiff network or None) of a checkpoint; a one-line UserError for anything else."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; pass a U-ViT or AdaDiff checkpoint such as "
                        "checkpoints/uvit_digits.pt")
    payload = read_checkpoint(path)
    kind = payload.get("format") if isinstance(payload, dict) else None
    if kind == ADADIFF_FORMAT:
        net = load_adadiff(path)
        return net.backbone, net
    if kind == UVIT_FORMAT:
        return load_model(path), None
    raise UserError(f"{path} is {_what_it_is(payload)}, not a U-ViT or AdaDiff checkpoint; pass the model "
                    "checkpoint itself (e.g. checkpoints/uvit_digits.pt), saved with save_checkpoint or save_adadiff")


def _what_it_is(payload) -> str:
    """A few words naming what a foreign checkpoint file holds."""
    if not isinstance(payload, dict):
        return f"a pickled {type(payload).__name__}"
    if "format" in payload:
        return f"a file of format {payload['format']!r}"
    if looks_official(payload):
        return "an official AdaDiff state dict without its U-ViT config"
    return "a plain state dict without a model config"


def block_names(model: UViT) -> list[str]:
    """Module names of the blocks in execution order."""
    return ([f"in_blocks.{i}" for i in range(len(model.in_blocks))] + ["mid_block"]
            + [f"out_blocks.{i}" for i in range(len(model.out_blocks))])


def part_of(parameter: str) -> str:
    """The network row a backbone parameter belongs to."""
    module, _, rest = parameter.partition(".")
    if module in EMBED_MODULES:
        return "embed"
    if module in HEAD_MODULES:
        return "head"
    if module in ("in_blocks", "out_blocks"):
        return f"{module}.{rest.split('.')[0]}"
    return module


def params_by_part(model: UViT) -> Counter:
    counts: Counter = Counter()
    for name, parameter in model.named_parameters():
        counts[part_of(name)] += parameter.numel()
    return counts


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(part: str, kind: str, macs: float, params: int, full: float) -> dict:
    return {"part": part, "kind": kind, "macs": int(macs), "flops": 2 * int(macs), "params": int(params),
            "share": float(macs) / full}


def network_rows(model: UViT, costs: UnitCosts) -> list[dict]:
    """embed, each block, head: MACs per image of one evaluation and the parameters each holds."""
    params = params_by_part(model)
    parts = ["embed", *block_names(model), "head"]
    macs = [costs.embed, *costs.blocks, costs.head]
    return [_row(part, NETWORK, m, params[part], costs.full) for part, m in zip(parts, macs)]


def overhead_rows(net: AdaDiffUViT, costs: UnitCosts) -> list[dict]:
    """One estimator call, one exit-head call, and the worst case (both after every block)."""
    n = net.num_exits
    estimator_macs = net.estimator.macs_per_sample(net.backbone.pos_embed.shape[1])  # as AdaDiff logs it
    head_params = num_params(net.exit_heads[0]) if net.exit_heads is not None else 0  # shared: the final head
    worst_macs = n * estimator_macs + (n - 1) * costs.head  # the N-th head is the network's own
    return [
        _row(f"estimator {net.config.estimator} (per call)", OVERHEAD, estimator_macs,
             num_params(net.estimator) // n, costs.full),  # one estimator per exit point
        _row(f"exit head {net.config.heads} (per call)", OVERHEAD, costs.head, head_params, costs.full),
        _row(f"worst case: {n} estimators + {n - 1} heads", WORST_CASE, worst_macs,
             num_params(net) - num_params(net.backbone), costs.full),
    ]


def cost_table(model: UViT, net: AdaDiffUViT | None = None) -> pd.DataFrame:
    """The table of a loaded backbone (and its AdaDiff network, for the overhead rows)."""
    costs = unit_costs(model)
    rows = network_rows(model, costs) + (overhead_rows(net, costs) if net is not None else [])
    return pd.DataFrame(rows, columns=COLUMNS)


def flops_table(path: str | Path) -> pd.DataFrame:
    """Per-part MACs, FLOPs, parameters and shares of a U-ViT or AdaDiff checkpoint (columns: COLUMNS)."""
    return cost_table(*load_for_flops(path))


# ---- plain-text rendering ---------------------------------------------------------------------
def _line(part: str, macs: float, params: float, share: float, width: int) -> str:
    return f"{part:{width}s} {macs / 1e6:10.3f} {params / 1e3:11,.1f} {100 * share:8.2f}%"


def format_table(frame: pd.DataFrame, steps: int | None = None) -> str:
    """Aligned text: MACs in M, params in K, share in %, then totals per evaluation (and per image)."""
    network = frame[frame["kind"] == NETWORK]
    full = int(network["macs"].sum())
    width = max(len("total, one evaluation"), *(len(part) for part in frame["part"]))
    lines = [f"{'part':{width}s} {'MACs (M)':>10s} {'params (K)':>11s} {'share':>9s}"]
    lines += [_line(r.part, r.macs, r.params, r.share, width) for r in network.itertuples()]
    lines.append(_line("total, one evaluation", full, network["params"].sum(), 1.0, width))
    overheads = frame[frame["kind"] != NETWORK]
    if len(overheads):
        lines.append("AdaDiff overheads (params: added by the row; a shared head adds none)")
        lines += [_line(r.part, r.macs, r.params, r.share, width) for r in overheads.itertuples()]
    lines.append(f"one evaluation: {full / 1e6:.3f} M MACs = {2 * full / 1e6:.3f} M FLOPs per image")
    if steps:
        lines.append(f"{steps} evaluations: {steps * full / 1e9:.3f} GMACs = {2 * steps * full / 1e9:.3f} GFLOPs "
                     "per image at full depth")
    if steps and len(overheads):
        worst = full + int(overheads[overheads["kind"] == WORST_CASE]["macs"].sum())
        lines.append(f"{steps} evaluations, worst case with overheads: {2 * steps * worst / 1e9:.3f} GFLOPs per image")
    lines.append("MACs of matmuls, convolutions and attention (as the step log counts); FLOPs = 2 x MACs; "
                 "norms and activations not counted")
    return "\n".join(lines)
