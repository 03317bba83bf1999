"""Per-part cost table of a checkpoint: what `adadiff-bench flops` prints.

Network rows, in execution order: `embed` (on U-ViT patch, time and label embedding, position table),
every block, `head` (norm, decoder, final conv), as the backbone's `cost_parts` names them. MACs are per
image and network evaluation, counted as in
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
from typing import TYPE_CHECKING

import pandas as pd
import torch

from .checkpoints import FORMAT as UVIT_FORMAT
from .checkpoints import load_checkpoint
from .errors import UserError
from .flops import unit_costs
from .models.backbone import Backbone
from .steplog import UnitCosts

if TYPE_CHECKING:
    from .methods.adadiff import AdaDiffNetwork

NETWORK, OVERHEAD, WORST_CASE = "network", "overhead", "worst case"
COLUMNS = ["part", "kind", "macs", "flops", "params", "share"]
READS = (UVIT_FORMAT, "adadiff-bench/adadiff")


def load_for_flops(path: str | Path) -> tuple[Backbone, AdaDiffNetwork | None]:
    """(backbone, AdaDiff network or None) of a checkpoint; a one-line UserError for anything else."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; pass a U-ViT or AdaDiff checkpoint such as "
                        "checkpoints/uvit_digits.pt")
    net = load_checkpoint(path, READS)
    return (net, None) if isinstance(net, Backbone) else (net.backbone, net)


def params_by_part(model: Backbone) -> Counter:
    """Parameters per network row: every parameter lies under one module (or is one parameter) of a piece."""
    parts = model.cost_parts()
    owners = [(name, "embed") for name in parts.embed] + [(name, name) for name in parts.blocks] \
        + [(name, "head") for name in parts.head]
    counts: Counter = Counter()
    for name, parameter in model.named_parameters():
        part = next(row for owner, row in owners if name == owner or name.startswith(owner + "."))
        counts[part] += parameter.numel()
    return counts


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(part: str, kind: str, macs: float, params: int, full: float) -> dict:
    return {"part": part, "kind": kind, "macs": int(macs), "flops": 2 * int(macs), "params": int(params),
            "share": float(macs) / full}


def network_rows(model: Backbone, costs: UnitCosts) -> list[dict]:
    """embed, each block, head: MACs per image of one evaluation and the parameters each holds."""
    params = params_by_part(model)
    parts = ["embed", *model.cost_parts().blocks, "head"]
    macs = [costs.embed, *costs.blocks, costs.head]
    return [_row(part, NETWORK, m, params[part], costs.full) for part, m in zip(parts, macs)]


def overhead_rows(net: AdaDiffNetwork, costs: UnitCosts) -> list[dict]:
    """One estimator call, one exit-head call, and the worst case (both after every block)."""
    n = net.num_exits
    estimator_macs = net.estimator.macs_per_sample(net.backbone.num_tokens)  # as AdaDiff logs it
    head_params = num_params(net.exit_heads[0]) if net.exit_heads is not None else 0  # shared: the final head
    worst_macs = n * estimator_macs + (n - 1) * costs.head  # the N-th head is the network's own
    return [
        _row(f"estimator {net.config.estimator} (per call)", OVERHEAD, estimator_macs,
             num_params(net.estimator) // n, costs.full),  # one estimator per exit point
        _row(f"exit head {net.config.heads} (per call)", OVERHEAD, costs.head, head_params, costs.full),
        _row(f"worst case: {n} estimators + {n - 1} heads", WORST_CASE, worst_macs,
             num_params(net) - num_params(net.backbone), costs.full),
    ]


def cost_table(model: Backbone, net: AdaDiffNetwork | None = None) -> pd.DataFrame:
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
