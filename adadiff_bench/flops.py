"""Unit costs of the network's pieces, measured once with fvcore.

Convention: MACs (multiply-accumulates) of matrix multiplications, convolutions and attention,
the ops torch's dispatch-level FlopCounterMode counts too; FLOPs = 2 x MACs. Normalisations,
activations and additions are not counted (fvcore would add ~0.6% for LayerNorm here). fvcore has no
handle for `scaled_dot_product_attention`, so one is registered: QK^T and AV each cost
B * H * L * S * D MACs.
"""
from __future__ import annotations

import copy
import warnings
from functools import lru_cache

import numpy as np
import torch
with warnings.catch_warnings():  # importing fvcore scripts a loss with the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from .device import module_device
from .models.backbone import BRANCHES, Backbone
from .steplog import UnitCosts

IGNORED_OPS = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm")


def sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: QK^T plus attention-weighted V."""
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch_dims, length, head_dim = q_shape
    source_length, value_dim = k_shape[-2], v_shape[-1]
    batch = int(np.prod(batch_dims))
    return batch * length * source_length * (head_dim + value_dim)


def _not_counted(inputs, outputs) -> int:
    return 0


def count_macs(module: torch.nn.Module, inputs: tuple) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    for op in IGNORED_OPS:  # a handle of None does not override fvcore's built-in norm handles
        analysis.set_op_handle(op, _not_counted)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


@lru_cache(maxsize=16)
def unit_costs(model: Backbone) -> UnitCosts:
    """MACs per image of the embedding, of each block (execution order), of each block's branches and of the head.

    Measured once per network (cached: a method built inside a timed pass must not trace the model again).
    Costs depend on shapes alone: a model on a GPU (or "meta") is traced as an uninitialised CPU copy."""
    parts = model.cost_parts()
    traced = model if module_device(model).type == "cpu" else copy.deepcopy(model).to_empty(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_module = count_macs(traced.eval(), traced.dummy_inputs()).by_module()

    def macs(names) -> float:
        return float(sum(by_module.get(name, 0) for name in names if name is not None))

    branches = np.array([[macs([names[b]]) for b in BRANCHES] for names in parts.branches], dtype=np.float64)
    return UnitCosts(embed=macs(parts.embed), blocks=np.array([macs([b]) for b in parts.blocks], dtype=np.float64),
                     head=macs(parts.head) + parts.untraced_head_macs, branches=branches)


def dispatch_flops(fn) -> int:
    """FLOPs of `fn()` counted at the dispatch level by torch's FlopCounterMode.

    torch has no formula for the CPU flash-attention kernel that `scaled_dot_product_attention`
    dispatches to; the generic SDPA formula is registered for it.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())
