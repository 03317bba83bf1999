"""Uncertainty estimators for AdaDiff's exit points: `ESTIMATORS`, a dict of named constructors.

Every estimator maps the hidden state after exit point i (and the timestep) to an uncertainty in
[0, 1], per pixel or per sample, so that one rule reads "exit when uncertainty <= threshold".
`uncertainty(...)` returns a map of shape (B, C, H, W) or (B,); `scalar(...)` its per-sample mean.

- `official`: the official AdaDiff code's module: per token `Linear(embed_dim -> patch^2 * C)` and a
  sigmoid on the detached hidden state (extra tokens dropped), unpatchified into a per-pixel
  *certainty* map; no timestep input. Uncertainty = 1 - certainty.
- `timestep`: the paper's timestep-aware module u = sigmoid(w_t^T [L_i, emb(t)] + b_t), per token.
  `timestep_weights = "shared"` reads w_t as one weight matrix with the timestep embedding among its
  inputs; `"bucketed"` as separate weights per timestep bucket.
- `probe`: a linear probe on the mean token, sigmoid: one scalar per sample.
- `attention`: a learned query attends over the tokens, then a small MLP and a sigmoid.

Sampling reads each exit's values through `raw_on_host` (host floats) and `uncertainty_of_raw` (their
float32 uncertainties); by default the first returns the uncertainty itself, so an estimator of your own
needs only `uncertainty`, `scalar` where it has a cheaper path, and `_per_exit_linears` for its MACs.

Every constructor takes (backbone, config): the backbone's geometry (width, patch, channels, extra
tokens, one exit per block) and the AdaDiff config's options. A package adds its own estimator with
`register_estimator(name, constructor)` (through the `adadiff_bench.methods` entry-point group), and
training and sampling pick it by name like the built-in ones.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from ...models.backbone import Backbone, timestep_embedding, unpatchify


class Estimator(nn.Module):
    """Base: one estimator per exit point (exit points are numbered 1..num_exits)."""
    per_pixel = False

    def __init__(self, backbone: Backbone, config=None):
        super().__init__()
        self.num_exits, self.embed_dim = backbone.num_blocks, backbone.embed_dim
        self.patch_size, self.in_chans, self.extras = backbone.patch_size, backbone.in_chans, backbone.extras

    def uncertainty(self, exit_point: int, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scalar(self, exit_point: int, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = self.uncertainty(exit_point, tokens, t)
        return u.flatten(1).mean(1) if u.dim() > 1 else u

    def scalar_on_host(self, exit_point: int, tokens: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        """`scalar` as a float32 array on the host."""
        return self.uncertainty_of_raw(self.raw_on_host(exit_point, tokens, t))

    def raw_on_host(self, exit_point: int, tokens: torch.Tensor, t: torch.Tensor) -> list[float]:
        """What sampling reads after every block (on a GPU, the one read a decision needs): one value per
        sample, as Python floats, from which `uncertainty_of_raw` gives `scalar` exactly. Here the
        uncertainty itself; an estimator whose last op would be a monotone map (the official `1 - certainty`)
        may return the value before it and leave the map to the host, so a threshold can be tested on the raw
        values without running it (see `AdaDiff.exits`). A raw value need not be a float32 value: the host
        reads its float32 rounding (a float32 quotient divided in double rounds to the float32 division's
        result)."""
        return self.scalar(exit_point, tokens, t).float().tolist()

    def uncertainty_of_raw(self, raw: list[float]) -> np.ndarray:
        """The float32 uncertainties of `raw_on_host`'s values (rounded to float32, then a monotone map; host)."""
        return np.asarray(raw, dtype=np.float32)

    def macs_per_sample(self, num_tokens: int) -> int:
        """MACs of one call on one sample (its linear layers; counted into the step log)."""
        return sum(m.in_features * m.out_features for m in self._per_exit_linears()) * self._rows(num_tokens)

    def _per_exit_linears(self) -> list[nn.Linear]:
        raise NotImplementedError

    def _rows(self, num_tokens: int) -> int:
        return num_tokens - self.extras

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens, cut off from the backbone's gradient (sampling runs without one: no op needed)."""
        patches = tokens[:, self.extras:, :]
        return patches.detach() if torch.is_grad_enabled() else patches

    def _to_map(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.in_chans)


class OfficialEstimator(Estimator):
    per_pixel = True

    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        out = self.patch_size ** 2 * self.in_chans
        self.certainty = nn.ModuleList([nn.Linear(self.embed_dim, out) for _ in range(self.num_exits)])
        self._cut = self.extras * out  # entries of a sample's flattened logits that belong to the extra tokens
        self._gathered: list | None = None

    def certainty_map(self, exit_point: int, tokens: torch.Tensor) -> torch.Tensor:
        return self._to_map(torch.sigmoid(self.certainty[exit_point - 1](self._patches(tokens))))

    def uncertainty(self, exit_point, tokens, t):
        return 1.0 - self.certainty_map(exit_point, tokens)

    def scalar(self, exit_point, tokens, t):
        # the mean over pixels is the mean over patch entries: no need to unpatchify
        return 1.0 - torch.sigmoid(self.certainty[exit_point - 1](self._patches(tokens))).flatten(1).mean(1)

    def raw_on_host(self, exit_point, tokens, t):
        """Each sample's mean certainty, in fewer ops than `scalar`: sampling decides after every block, and
        after a block has filled the caches every op and every Python lookup costs several times what it
        costs warm.

        The linear runs on the whole token matrix (a strided slice of the patch tokens would be copied first)
        with the exit's transposed weight kept from call to call, and the extras' entries are skipped by one
        strided view of its output. The sigmoid runs in place; `1 - mean` is left to `uncertainty_of_raw`,
        on the host in float32 like torch's, so each sample's uncertainty is bit for bit `scalar`'s.

        On the CPU in float32, torch's mean is its sum divided by the count in float32, and its second op made
        it about a quarter of a decision's time: the host divides the sums instead, in double, whose rounding to
        float32 is the float32 quotient (double has more than twice float32's precision, so rounding twice gives
        the correctly rounded result)."""
        weight_t, bias = self._exit_linear(exit_point)
        batch, length, width = tokens.shape
        logits = torch.addmm(bias, tokens.reshape(batch * length, width), weight_t)  # (batch * length, out)
        per_sample = length * logits.shape[1]
        patches = logits.as_strided((batch, per_sample - self._cut), (per_sample, 1), self._cut).sigmoid_()
        if patches.dtype == torch.float32 and patches.is_cpu:
            count = float(per_sample - self._cut)
            return [total / count for total in patches.sum(1).tolist()]
        certainty = patches.mean(1)
        return (certainty if certainty.dtype == torch.float32 else certainty.float()).tolist()

    def uncertainty_of_raw(self, raw):
        return np.float32(1.0) - np.asarray(raw, dtype=np.float32)

    def _exit_linear(self, exit_point: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight transposed, bias) of an exit's linear, without a walk through the module tree: gathered
        once, and again after `.to()` and the like (`_apply`), a state-dict load, or a swap of a weight's data."""
        if self._gathered is None:
            self._gathered = [(linear.weight, linear.weight.detach().t(), linear.bias) for linear in self.certainty]
        weight, weight_t, bias = self._gathered[exit_point - 1]
        if weight_t.data_ptr() != weight.data_ptr():
            self._gathered = None
            return self._exit_linear(exit_point)
        return weight_t, bias

    def _apply(self, fn, *args, **kwargs):
        self._gathered = None  # a conversion may replace the Parameter objects
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._gathered = None  # so may loading with `assign=True`
        super()._load_from_state_dict(*args, **kwargs)

    def _per_exit_linears(self):
        return [self.certainty[0]]


class TimestepEstimator(Estimator):
    per_pixel = True

    def __init__(self, backbone, config=None, num_buckets: int = 10):
        super().__init__(backbone, config)
        weights = getattr(config, "timestep_weights", "shared")
        if weights not in ("shared", "bucketed"):
            raise ValueError(f"timestep_weights must be 'shared' or 'bucketed', got {weights!r}")
        self.weights, self.num_buckets = weights, num_buckets
        out = self.patch_size ** 2 * self.in_chans
        if weights == "shared":
            self.linear = nn.ModuleList([nn.Linear(2 * self.embed_dim, out) for _ in range(self.num_exits)])
        else:
            self.linear = nn.ModuleList([nn.Linear(self.embed_dim, out)
                                         for _ in range(self.num_exits * num_buckets)])

    def uncertainty(self, exit_point, tokens, t):
        patches = self._patches(tokens)
        if self.weights == "shared":
            emb = timestep_embedding(t, self.embed_dim).to(patches.dtype)
            inputs = torch.cat([patches, emb[:, None, :].expand(-1, patches.shape[1], -1)], dim=-1)
            logits = self.linear[exit_point - 1](inputs)
        else:
            bucket = (t.float() * self.num_buckets / 1000).long().clamp(0, self.num_buckets - 1)
            base = (exit_point - 1) * self.num_buckets
            logits = torch.stack([self.linear[base + int(b)](p) for p, b in zip(patches, bucket)])
        return self._to_map(torch.sigmoid(logits))

    def _per_exit_linears(self):
        return [self.linear[0]]


class ProbeEstimator(Estimator):
    def __init__(self, backbone, config=None):
        super().__init__(backbone, config)
        self.probe = nn.ModuleList([nn.Linear(self.embed_dim, 1) for _ in range(self.num_exits)])

    def uncertainty(self, exit_point, tokens, t):
        return torch.sigmoid(self.probe[exit_point - 1](tokens.detach().mean(1))).squeeze(-1)

    def _per_exit_linears(self):
        return [self.probe[0]]

    def _rows(self, num_tokens):
        return 1


class AttentionEstimator(Estimator):
    def __init__(self, backbone, config=None, hidden: int = 64):
        super().__init__(backbone, config)
        d = self.embed_dim
        self.query = nn.Parameter(torch.zeros(self.num_exits, d))
        nn.init.normal_(self.query, std=d ** -0.5)
        self.key = nn.ModuleList([nn.Linear(d, d) for _ in range(self.num_exits)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1))
                                  for _ in range(self.num_exits)])

    def uncertainty(self, exit_point, tokens, t):
        tokens = tokens.detach()
        keys = self.key[exit_point - 1](tokens)                                   # B L D
        scores = keys @ self.query[exit_point - 1] / self.embed_dim ** 0.5       # B L
        pooled = (scores.softmax(dim=1)[..., None] * tokens).sum(1)              # B D
        return torch.sigmoid(self.mlp[exit_point - 1](pooled)).squeeze(-1)

    def macs_per_sample(self, num_tokens):
        d = self.embed_dim
        hidden = self.mlp[0][0].out_features
        return num_tokens * d * d + 2 * num_tokens * d + d * hidden + hidden


ESTIMATORS: dict[str, Callable[..., Estimator]] = {
    "official": OfficialEstimator,
    "timestep": TimestepEstimator,
    "probe": ProbeEstimator,
    "attention": AttentionEstimator,
}


def register_estimator(name: str, constructor: Callable[..., Estimator]) -> None:
    """Add an estimator under `name`: `constructor(backbone, config)` returns an `Estimator`."""
    if not name or name in ESTIMATORS:
        raise ValueError(f"estimator name {name!r} is empty or already taken ({', '.join(ESTIMATORS)})")
    ESTIMATORS[name] = constructor
