"""DiT backbone (Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023), as diffusers'
`DiTTransformer2DModel`, behind the backbone interface (`models.backbone`).

The wrapped model is diffusers' own, so its `save_pretrained` folders (e.g. `facebook/DiT-XL-2-256`'s
`transformer/`) load unchanged and a run at full depth is diffusers' forward, op for op. What a DiT differs in
from U-ViT, seen through the interface:
- no long skips (every block is `plain`) and no extra tokens: the patches are the whole sequence;
- the blocks' shared state is the conditioning input (timestep and class label per sample): each block turns
  it into its adaLN-Zero shift, scale and gate with its own `norm1` (diffusers keeps a copy of the timestep
  and label embedders in every block; the official DiT shares one);
- the final layer (adaLN-modulated norm and projection) reads the conditioning of block 0's embedders, as
  diffusers' forward does. It is the shared exit head, so it is computed in the head's own module
  (`HeadConditioning`) and every exit pays for it;
- a learned-sigma model (out_channels = 2 x in_channels, as DiT-XL/2) predicts eps and a variance: the head
  returns the eps half, what deterministic solvers and every method read, and hands the variance half to the
  learned-variance sampler when one collects it (`models.variance`).

A block's residual branches ("attn", "mlp") are the gated attention and feed-forward outputs, so the feature
caches (FORA, Learning-to-Cache) reuse exactly what the block adds.

Batch size never changes an image on U-ViT, and does not here: the token path's matrix products round alike
at any batch, but the conditioning path's (one vector per sample: the timestep embedder, each block's adaLN
projection, the final layer's) took another kernel at another batch size (1e-7 apart, 2e-5 after one block).
Those layers (`PerSampleLinear`) run as a batch of one-row products (`bmm`), each sample's its own; torch's
dispatcher and fvcore count them as the plain layer. Likewise SiLU and the tanh GELU: torch computes a
tensor's tail elements on a scalar path that rounds differently from its vector path, so which elements of a
sample fall in the tail depends on the batch; they are computed here from `exp` and division, which round alike
on both paths (1e-7 from torch's own). Only while autograd records (training) do these layers use torch's own
batched kernels instead: batch invariance is a sampling contract, and the invariant kernels made a training
step of the digits DiT about 1.9x slower (`benchmarks/dit_train_step.py`, side by side, batch 128).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import variance
from .backbone import Backbone, BranchHook, CostParts, unpatchify


def training() -> bool:
    """Whether autograd records: then torch's own batched kernels, else the batch-invariant ones (sampling)."""
    return torch.is_grad_enabled()


def silu(x: torch.Tensor) -> torch.Tensor:
    """x sigmoid(x), from exp (batch-invariant; see the module docstring)."""
    return F.silu(x) if training() else x / (1 + torch.exp(-x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, 0.5 x (1 + tanh z) = x - x / (exp(2z) + 1), from exp (batch-invariant)."""
    if training():
        return F.gelu(x, approximate="tanh")
    z = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    return x - x / (torch.exp(2 * z) + 1)


class InvariantSiLU(nn.SiLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


def invariant_gelu(module: nn.Module) -> None:
    """diffusers' GELU layer (projection, then GELU) with its tanh approximation computed by `gelu_tanh`."""
    if getattr(module, "approximate", "none") == "tanh":
        module.gelu = gelu_tanh  # (an instance attribute: the layer's `forward` calls self.gelu(projected))


class PerSampleLinear(nn.Linear):
    """nn.Linear (same parameters) on one vector per sample (B x in), as B one-row products: a sample's result
    does not depend on how many others share its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if training():
            return F.linear(x, self.weight, self.bias)
        out = torch.bmm(x.unsqueeze(1), self.weight.t().unsqueeze(0).expand(len(x), -1, -1)).squeeze(1)
        return out if self.bias is None else out + self.bias


def per_sample_layers(transformer: nn.Module) -> list[nn.Linear]:
    """The linear layers of a DiT's conditioning path: each block's timestep embedder and adaLN projection, and
    the final layer's modulation."""
    layers = [transformer.proj_out_1]
    for block in transformer.transformer_blocks:
        embedder = block.norm1.emb.timestep_embedder
        layers += [embedder.linear_1, embedder.linear_2, block.norm1.linear]
    return layers


def dit_class():
    """diffusers' DiTTransformer2DModel (imported on use: diffusers is slow to import)."""
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel


@dataclass
class DiTConditions:
    """A DiT's block state: each sample's timestep and class label (what every adaLN-Zero reads), and which
    rows of the evaluation's batch these samples are (where a learned-sigma head's variance goes)."""
    t: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor | None = None   # None: the whole batch, in order

    def subset(self, rows: torch.Tensor) -> DiTConditions:
        every = torch.arange(len(self.t), device=self.t.device) if self.rows is None else self.rows
        return DiTConditions(self.t[rows], self.y[rows], every[rows])


class HeadConditioning(nn.Module):
    """The final layer's conditioning: block 0's timestep and label embedders, computed here so that their cost
    is the head's (a tracer charges a module's ops to where the module is registered). It holds no parameters
    of its own: it reads block 0's, unregistered."""

    def __init__(self, embedders: nn.Module):
        super().__init__()
        object.__setattr__(self, "embedders", embedders)  # not a child: the parameters stay under block 0

    def forward(self, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return conditioning(self.embedders, t, y, dtype)


def conditioning(embedders: nn.Module, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' CombinedTimestepLabelEmbeddings at eval (no label dropout), as plain ops on its parameters:
    sinusoidal timestep features -> linear, SiLU, linear; plus the label's embedding row."""
    timestep = embedders.timestep_embedder
    features = embedders.time_proj(t).to(dtype)
    hidden = silu(PerSampleLinear.forward(timestep.linear_1, features))  # (not a module call: the head's cost)
    return PerSampleLinear.forward(timestep.linear_2, hidden) + \
        F.embedding(y, embedders.class_embedder.embedding_table.weight)


def final_layer(tokens: torch.Tensor, state: DiTConditions, cond: torch.Tensor, norm_out: nn.Module,
                proj_out_1: nn.Module, proj_out_2: nn.Module, out_channels: int, in_channels: int) -> torch.Tensor:
    """adaLN-modulated norm, projection to patches, unpatchify; of a learned-sigma output the eps channels are
    returned and the variance channels handed to a sampler that collects them (`models.variance`)."""
    shift, scale = proj_out_1(silu(cond)).chunk(2, dim=1)
    patches = proj_out_2(norm_out(tokens) * (1 + scale[:, None]) + shift[:, None])
    out = unpatchify(patches, out_channels)
    if out_channels > in_channels:
        variance.store(state.rows, out[:, in_channels:])
    return out[:, :in_channels]


class DiT(nn.Module, Backbone):
    """A diffusers `DiTTransformer2DModel` run piece by piece (see the module docstring)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        config = transformer.config
        self.transformer = transformer
        self.in_chans, self.out_chans = config.in_channels, transformer.out_channels
        self.img_size, self.patch_size = config.sample_size, config.patch_size
        self.embed_dim = transformer.inner_dim
        self.num_classes = self.blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings  # rows, as U-ViT's
        self.extras = 0
        self.head_conditioning = HeadConditioning(self.blocks[0].norm1.emb)
        for block in self.blocks:  # labels are dropped by the training loss, once per sample for every block:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # each block's own embedder would draw its own
        for layer in per_sample_layers(transformer):  # (a subclass that changes only `forward`: same parameters)
            layer.__class__ = PerSampleLinear
        for block in self.blocks:  # batch-invariant activations (see the module docstring)
            block.norm1.silu.__class__ = InvariantSiLU
            block.norm1.emb.timestep_embedder.act.__class__ = InvariantSiLU
            invariant_gelu(block.ff.net[0])

    @classmethod
    def from_config(cls, **config) -> DiT:
        """A DiT with fresh weights from diffusers' constructor arguments (num_layers, patch_size, ...)."""
        return cls(dit_class()(**config))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def block_kinds(self) -> tuple[str, ...]:
        return ("plain",) * len(self.blocks)

    @property
    def learned_sigma(self) -> bool:
        """The model also predicts a variance (DiT-XL/2's 8 output channels for 4 latent ones)."""
        return self.out_chans == 2 * self.in_chans

    @property
    def null_label(self) -> int | None:
        """The label row of guidance's unconditional pass: the embedding table's extra row, when it has one."""
        classes = self.transformer.config.num_embeds_ada_norm
        return classes if self.num_classes > classes else None

    def begin(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, DiTConditions]:
        """Patches with positions added; the state is each sample's (t, y)."""
        if y is None:
            raise ValueError("a DiT is class-conditional: give each sample a label (y), or its null label "
                             f"{self.null_label} for an unconditional pass")
        return self.transformer.pos_embed(x), DiTConditions(t.reshape(len(x)), y)

    def run_block(self, index: int, tokens: torch.Tensor, state: DiTConditions,
                  branch: BranchHook | None = None) -> torch.Tensor:
        block = self.blocks[index]
        if branch is None:
            return block(tokens, timestep=state.t, class_labels=state.y)
        # adaLN-Zero: the block's own conditioning sets each branch's input shift/scale and output gate; computed
        # once, and only when a branch runs (a cache that serves both branches needs none of it)
        modulation = functools.cache(lambda first=tokens: block.norm1(first, state.t, state.y,
                                                                      hidden_dtype=first.dtype))

        def attn():
            normed, gate_msa, *_ = modulation()
            return gate_msa.unsqueeze(1) * block.attn1(normed)

        def mlp():
            _, _, shift_mlp, scale_mlp, gate_mlp = modulation()
            return gate_mlp.unsqueeze(1) * block.ff(block.norm3(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])

        tokens = tokens + branch("attn", attn)
        return tokens + branch("mlp", mlp)

    def bypass_block(self, index: int, tokens: torch.Tensor, state: DiTConditions,
                     fuse_skip: bool = False) -> torch.Tensor:
        return tokens  # no skip to keep or fuse

    def head(self, tokens: torch.Tensor, state: DiTConditions) -> torch.Tensor:
        cond = self.head_conditioning(state.t, state.y, tokens.dtype)
        model = self.transformer
        return final_layer(tokens, state, cond, model.norm_out, model.proj_out_1, model.proj_out_2, self.out_chans,
                           self.in_chans)

    def copy_head(self) -> DiTHead:
        return DiTHead(self)

    def cost_parts(self) -> CostParts:
        names = tuple(f"transformer.transformer_blocks.{i}" for i in range(len(self.blocks)))
        return CostParts(embed=("transformer.pos_embed",), blocks=names,
                         branches=tuple({"attn": f"{name}.attn1", "mlp": f"{name}.ff", "fusion": None}
                                        for name in names),
                         head=("head_conditioning", "transformer.norm_out", "transformer.proj_out_1",
                               "transformer.proj_out_2"))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.full_depth(x, timesteps, y)


class DiTHead(nn.Module):
    """A trainable copy of a DiT's final layer and of the embedders its conditioning comes from (an early
    exit's own head), called as head(tokens, state)."""

    def __init__(self, backbone: DiT):
        super().__init__()
        model = backbone.transformer
        self.embedders = copy.deepcopy(backbone.blocks[0].norm1.emb)
        self.norm_out, self.proj_out_1, self.proj_out_2 = (copy.deepcopy(m) for m in
                                                           (model.norm_out, model.proj_out_1, model.proj_out_2))
        self.in_chans, self.out_chans = backbone.in_chans, backbone.out_chans

    def forward(self, tokens: torch.Tensor, state: DiTConditions) -> torch.Tensor:
        cond = conditioning(self.embedders, state.t, state.y, tokens.dtype)
        return final_layer(tokens, state, cond, self.norm_out, self.proj_out_1, self.proj_out_2, self.out_chans,
                           self.in_chans)
