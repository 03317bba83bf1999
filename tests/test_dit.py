"""The DiT backbone (diffusers' DiTTransformer2DModel behind the backbone interface) against diffusers' own
forward, its costs against torch's dispatcher and against the DiT paper's count, and methods run on it."""
from __future__ import annotations

import pytest
import torch

from adadiff_bench.flops import dispatch_flops, unit_costs
from adadiff_bench.methods import available_methods
from adadiff_bench.models.dit import DiT
from adadiff_bench.testing import check_method_contracts

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=3, sample_size=8,
                patch_size=2, num_embeds_ada_norm=10)
# DiT-XL/2 at 256 px (facebook/DiT-XL-2-256's transformer config): 4 x 32 x 32 latents, learned sigma
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def tiny_dit(seed: int = 0, std: float = 0.3, **changes) -> DiT:
    """A tiny DiT with every weight random (diffusers zero-initialises nothing, but gates near 0 would hide
    a wrong branch), in eval mode."""
    torch.manual_seed(seed)
    model = DiT.from_config(**{**TINY_DIT, **changes})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, std)
    return model.eval()


def inputs(n: int = 4, channels: int = 1, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(n, channels, size, size, generator=generator),
            torch.randint(0, 1000, (n,), generator=generator), torch.randint(0, 10, (n,), generator=generator))


def untouched_diffusers(model: DiT, **config):
    """diffusers' own DiTTransformer2DModel with the model's weights (its conditioning layers in float32)."""
    from adadiff_bench.models.dit import dit_class
    reference = dit_class()(**{**TINY_DIT, **config}).eval()
    reference.load_state_dict(model.transformer.state_dict())
    return reference


@torch.no_grad()
def test_full_depth_equals_diffusers_forward():
    model = tiny_dit()
    x, t, y = inputs()
    theirs = untouched_diffusers(model)(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(model(x, t, y), theirs, rtol=1e-5, atol=1e-5)  # (batch-invariant ops: 1e-7 apart)
    torch.testing.assert_close(model(x, t, y), model.transformer(x, timestep=t, class_labels=y).sample, rtol=1e-6,
                               atol=1e-6)  # the wrapped model's own forward (its final layer's SiLU is torch's)


@torch.no_grad()
def test_learned_sigma_head_returns_the_eps_half_of_diffusers_output():
    model = tiny_dit(out_channels=2)
    x, t, y = inputs()
    assert model.learned_sigma
    theirs = untouched_diffusers(model, out_channels=2)(x, timestep=t, class_labels=y).sample[:, :1]
    torch.testing.assert_close(model(x, t, y), theirs, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batch_size_does_not_change_the_prediction():
    model = tiny_dit()
    x, t, y = inputs(n=5)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
    assert torch.equal(model(x, t, y), alone)


def aten_ops(fn) -> set[str]:
    """The aten ops `fn` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_training_uses_torchs_batched_kernels_for_the_same_function():
    """While autograd records, the conditioning layers are plain linear layers and the activations torch's own
    (fast to train); the prediction is the batch-invariant one within float rounding, and gradients reach every
    conditioning weight."""
    model = tiny_dit()
    x, t, y = inputs(n=5)
    with torch.no_grad():
        sampled = model(x, t, y)
        assert "bmm" in aten_ops(lambda: model(x, t, y))
    trained = model(x, t, y)
    torch.testing.assert_close(trained, sampled, rtol=1e-5, atol=1e-5)
    assert "bmm" not in aten_ops(lambda: model(x, t, y))  # (a tiny DiT's attention runs no bmm on the CPU)
    trained.square().sum().backward()
    assert all(block.norm1.linear.weight.grad.abs().sum() > 0 for block in model.blocks)


@torch.no_grad()
def test_branch_hooks_see_what_the_block_adds():
    """Passing each branch's fresh output through the hook is the block itself; a branch replaced by zeros
    leaves exactly the other branch's addition (the gate is inside the branch)."""
    model = tiny_dit()
    x, t, y = inputs()
    tokens, state = model.begin(x, t, y)
    plain = model.run_block(1, tokens, state)
    torch.testing.assert_close(model.run_block(1, tokens, state, branch=lambda name, compute: compute()), plain,
                               rtol=0, atol=1e-6)
    seen = {}

    def record(name, compute):
        seen[name] = compute()
        return seen[name]

    model.run_block(1, tokens, state, branch=record)
    assert set(seen) == {"attn", "mlp"}
    torch.testing.assert_close(tokens + seen["attn"] + seen["mlp"], plain, rtol=0, atol=1e-6)


@torch.no_grad()
def test_a_subset_state_and_the_copied_head_agree_with_the_model():
    model = tiny_dit()
    x, t, y = inputs()
    tokens, state = model.begin(x, t, y)
    rows = torch.tensor([0, 2])
    assert torch.equal(model.head(tokens[rows], state.subset(rows)), model.head(tokens, state)[rows])
    torch.testing.assert_close(model.copy_head()(tokens, state), model.head(tokens, state), rtol=0, atol=1e-6)


def test_costs_cover_every_parameter_once_and_the_head_pays_for_its_conditioning():
    model = tiny_dit()
    parts = model.cost_parts()
    owned = [name for name, _ in model.named_parameters()]
    listed = [*parts.embed, *parts.blocks, *parts.head]
    assert all(sum(name.startswith(part + ".") for part in listed) == 1 for name in owned)
    costs = unit_costs(model)
    width, features = model.embed_dim, 256  # diffusers' sinusoidal timestep features
    head_conditioning = features * width + width * width
    assert costs.head == pytest.approx(head_conditioning + 2 * width * width + 16 * width * 4, rel=1e-9)


def test_step_log_flops_equal_the_dispatcher_at_full_depth():
    model = tiny_dit()
    x, t, y = inputs()
    costs = unit_costs(model)
    logged = costs.embed + costs.blocks.sum() + costs.head
    assert 2 * logged * len(x) == pytest.approx(dispatch_flops(lambda: model(x, t, y)), rel=1e-6)


def test_dit_xl_2_costs_what_the_dit_paper_reports():
    """DiT-XL/2 at 256 px: 118.6 Gflops per forward in the DiT paper (Table 4; its "flops" are multiply-adds),
    built on the meta device and traced from an empty copy (no weights are read). In a process of its own: the
    3 GB copy would stay in this process's heap and hide later tests' memory peaks."""
    import subprocess
    import sys
    code = ("import torch; from adadiff_bench.flops import unit_costs; from adadiff_bench.models.dit import DiT\n"
            "with torch.device('meta'):\n"
            f"    model = DiT.from_config(**{DIT_XL_2!r})\n"
            "costs = unit_costs(model); print((costs.embed + costs.blocks.sum() + costs.head) / 1e9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(118.6, abs=0.1)


# knobs that fit a 3-block DiT where the defaults are sized for the 13-block digits U-ViT
DIT_KNOBS = {"static-exit": {"k": 2}, "fora": {"interval": 2}, "random-exit": {"layer_ratio": 0.6},
             "delta-dit": {"num_cached": 1}}
# methods whose default knobs name files trained on the digits U-ViT: each is trained on a DiT base below
TRAINED_ON_A_DIT = {"adadiff", "ase", "berxit", "l2c", "duodiff"}
NEEDS_LONG_SKIPS = {"deepcache"}  # refuses a DiT in one line (test_deepcache_refuses_a_dit_in_one_line)


@pytest.mark.parametrize("name", [n for n in available_methods() if n not in TRAINED_ON_A_DIT | NEEDS_LONG_SKIPS])
def test_every_method_keeps_the_contracts_on_a_dit(name):
    """Every registered method on a small random DiT (a new method is checked here without being listed); those
    that train, and DeepCache, have tests of their own below."""
    check_method_contracts(name, tiny_dit(std=0.05), DIT_KNOBS.get(name, {}))


# ---- loading: this suite's format, diffusers folders, hostile files ---------------------------------------

# facebook/DiT-XL-2-256's transformer/config.json, as written by the diffusers release that published it
DIT_XL_2_CONFIG_JSON = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                        "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
                        "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
                        "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
                        "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
                        "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
                        "upcast_attention": False, "use_linear_projection": False}


def same_outputs(a: DiT, b: DiT) -> None:
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=0, atol=0)


def test_suite_checkpoint_round_trip(tmp_path):
    from adadiff_bench.checkpoints import load_model, save_checkpoint
    from adadiff_bench.config import DiTConfig
    model = tiny_dit()
    save_checkpoint(tmp_path / "dit.pt", model, DiTConfig(**TINY_DIT))
    loaded = load_model(tmp_path / "dit.pt")
    assert isinstance(loaded, DiT) and loaded.config == DiTConfig(**TINY_DIT)
    same_outputs(loaded, model)


def test_a_diffusers_folder_loads_and_equals_the_saved_model(tmp_path):
    from adadiff_bench.checkpoints import load_model
    model = tiny_dit()
    model.transformer.save_pretrained(tmp_path / "pipeline" / "transformer")
    assert (tmp_path / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    same_outputs(load_model(tmp_path / "pipeline"), model)  # a pipeline's folder: its transformer/


def test_dit_xl_2_config_and_names_load_on_the_meta_device(tmp_path):
    """The published config parses to DiT-XL/2's shapes, and the model it builds on the meta device (nothing
    allocated) has the published checkpoint's parameter names and shapes."""
    import dataclasses
    import json
    from adadiff_bench.checkpoints import diffusers_dit_config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DIT_XL_2_CONFIG_JSON))
    config = diffusers_dit_config(path)
    assert {k: getattr(config, k) for k in DIT_XL_2} == DIT_XL_2
    with torch.device("meta"):
        state = DiT.from_config(**dataclasses.asdict(config)).transformer.state_dict()
    published = {"pos_embed.proj.weight": (1152, 4, 2, 2), "proj_out_1.weight": (2304, 1152),
                 "proj_out_2.weight": (32, 1152), "transformer_blocks.0.attn1.to_q.weight": (1152, 1152),
                 "transformer_blocks.0.norm1.linear.weight": (6912, 1152),
                 "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight": (1001, 1152),
                 "transformer_blocks.27.ff.net.2.weight": (1152, 4608)}
    assert {k: tuple(state[k].shape) for k in published} == published
    assert "transformer_blocks.28.attn1.to_q.weight" not in state


@pytest.mark.parametrize("file, content, message", [
    ("config.json", "{not json", "not readable JSON"),
    ("config.json", {"_class_name": "UNet2DModel"}, "not a DiT"),
    ("config.json", {"cross_attention_dim": 768}, "not a patched, class-conditional DiT"),
    ("config.json", {"num_layers": "many"}, "num_layers"),
    ("config.json", {"num_layers": 1_000_000_000}, "layers but its state dict holds only"),
    ("config.json", {"norm_type": "ada_norm"}, "ada_norm_zero"),
    ("diffusion_pytorch_model.safetensors", "\x00" * 64, "corrupt"),
])
def test_a_hostile_diffusers_folder_is_refused_in_one_line(tmp_path, file, content, message):
    """A folder's config entries are merged into a good config.json; a string replaces the file."""
    import json
    from adadiff_bench.checkpoints import load_model
    from adadiff_bench.errors import UserError
    tiny_dit().transformer.save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / file).write_text(json.dumps({**good, **content}) if isinstance(content, dict) else content)
    with pytest.raises(UserError, match=message) as caught:
        load_model(tmp_path)
    assert "\n" not in str(caught.value)


# ---- training a DiT from scratch (`[dit]`), and sampling from what it wrote --------------------------------

TRAIN_TINY_DIT = """
[data]
name = "digits"

[dit]
num_attention_heads = 2
attention_head_dim = 8
num_layers = 2
num_embeds_ada_norm = {classes}

[train]
steps = 3
batch_size = 8
warmup_steps = 0
checkpoint_every = 1000
threads = 1
out_dir = "{out_dir}"
export = "{export}"
"""


def test_a_dit_trains_from_a_dit_table_and_its_export_samples(tmp_path):
    from adadiff_bench.checkpoints import load_model
    from adadiff_bench.harness import Cell, generate
    from adadiff_bench.training import load_train_config, train
    path = tmp_path / "dit.toml"
    path.write_text(TRAIN_TINY_DIT.format(classes=10, out_dir=tmp_path / "run", export=tmp_path / "dit.pt"))
    model = load_model(train(load_train_config(path), progress=False))
    assert isinstance(model, DiT) and model.num_blocks == 2 and model.null_label == 10
    images, log = generate(Cell("full", (), "ddim", 2, 0), model, 3, 3)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all() and log.layer_ratio() == 1.0


def test_a_dit_table_refuses_a_model_table_beside_it_and_too_few_classes(tmp_path):
    from adadiff_bench.errors import UserError
    from adadiff_bench.training import load_train_config, train
    path = tmp_path / "dit.toml"
    path.write_text(TRAIN_TINY_DIT.format(classes=10, out_dir=tmp_path / "run", export="") + "[model]\ndepth = 2\n")
    with pytest.raises(UserError, match="model and dit exclude each other"):
        load_train_config(path)
    path.write_text(TRAIN_TINY_DIT.format(classes=5, out_dir=tmp_path / "run", export=""))
    with pytest.raises(UserError, match="the data set has 10 classes but the model embeds 5"):
        train(load_train_config(path), progress=False)


def test_label_dropout_replaces_about_the_share_asked_with_the_null_label():
    from adadiff_bench.training import drop_labels
    y = torch.arange(10).repeat(1000)
    dropped = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(0))
    assert ((dropped == 10) | (dropped == y)).all()
    assert (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_a_sample_size_no_weight_bounds_is_refused_before_building(tmp_path):
    """A DiT's positions are computed from sample_size, not stored: a huge one would allocate at build time."""
    import json
    from adadiff_bench.checkpoints import load_model
    from adadiff_bench.errors import UserError
    tiny_dit().transformer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sample_size": 1 << 20}))
    with pytest.raises(UserError, match="at most 1024"):
        load_model(tmp_path)


# ---- guidance on a DiT: the DiT paper's channel rule and diffusers' DiTPipeline rule -----------------------

def explicit_dit_guidance(transformer, x, t, y, null, scale, channels):
    """Two explicit passes combined as the DiT paper's `forward_with_cfg` (channels = 3) or diffusers'
    DiTPipeline (channels = every latent channel) do; the eps part of the result."""
    out_c = transformer(x, timestep=t, class_labels=y).sample
    out_u = transformer(x, timestep=t, class_labels=torch.full_like(y, null)).sample
    guided_part = out_u[:, :channels] + scale * (out_c[:, :channels] - out_u[:, :channels])
    return torch.cat([guided_part, out_c[:, channels:]], dim=1)[:, :x.shape[1]]


@pytest.mark.parametrize("channels, explicit_channels", [(3, 3), (0, 4)])
@torch.no_grad()
def test_guidance_channel_rules_equal_two_explicit_passes(channels, explicit_channels):
    from adadiff_bench.guidance import guided, null_condition
    model = tiny_dit(in_channels=4, out_channels=8)
    x, t, y = inputs(channels=4)
    plain = lambda x, t, y, ctx: model(x, t, y)  # noqa: E731
    ours = guided(plain, plain, 1.5, null_condition(model), channels)(x, t, y, None)
    theirs = explicit_dit_guidance(model.transformer, x, t, y, model.null_label, 1.5, explicit_channels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert model.null_label == 10


def test_a_channel_rule_needs_guidance_and_that_many_channels():
    from adadiff_bench.config import SamplingConfig
    from adadiff_bench.errors import UserError
    from adadiff_bench.guidance import check_guidance
    with pytest.raises(UserError, match="set only with guidance > 1"):
        SamplingConfig(guidance=1.0, guidance_channels=3).validate("[sampling]")
    with pytest.raises(UserError, match="guidance_channels = 5 but the network's output has 4 channels"):
        check_guidance(1.5, tiny_dit(in_channels=4), "[sampling]", 5)


def test_deepcache_refuses_a_dit_in_one_line():
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods import get_method, make_params
    cls = get_method("deepcache")
    with pytest.raises(UserError, match="long skip") as caught:
        cls.check(make_params(cls, {}, "deepcache"), tiny_dit(), "deepcache")
    assert "\n" not in str(caught.value)


# ---- exit methods trained on a DiT: AdaDiff's estimators and UAL, exactly as on U-ViT ----------------------

def dit_base(tmp_path, seed: int = 0):
    """A tiny DiT saved in this suite's format (the base a method trains on; weights small enough that a few
    training steps stay finite), and the model loaded back."""
    from adadiff_bench.checkpoints import load_model, save_checkpoint
    from adadiff_bench.config import DiTConfig
    save_checkpoint(tmp_path / "dit.pt", tiny_dit(seed, std=0.05), DiTConfig(**TINY_DIT))
    return tmp_path / "dit.pt", load_model(tmp_path / "dit.pt")


@pytest.mark.parametrize("estimator", ["official", "timestep", "probe", "attention"])
def test_adadiff_on_a_dit_round_trips_and_its_last_exit_is_full_depth(tmp_path, estimator):
    from adadiff_bench.config import DiTConfig
    from adadiff_bench.methods.adadiff import AdaDiffConfig, AdaDiffNetwork, load_adadiff, save_adadiff
    net = AdaDiffNetwork(tiny_dit(), AdaDiffConfig(estimator=estimator, heads="per-exit")).eval()
    save_adadiff(tmp_path / "adadiff.pt", net, DiTConfig(**TINY_DIT))
    loaded = load_adadiff(tmp_path / "adadiff.pt")
    assert isinstance(loaded.backbone, DiT) and loaded.num_exits == 3
    x, t, y = inputs()
    with torch.no_grad():
        predictions, uncertainties = loaded.all_exits(x, t, y)
        torch.testing.assert_close(predictions[-1], net.backbone(x, t, y), rtol=0, atol=0)
        torch.testing.assert_close(predictions[0], net.all_exits(x, t, y)[0][0], rtol=0, atol=0)
    assert all(((u >= 0) & (u <= 1)).all() for u in uncertainties)


TRAIN_ON_DIT = """
[train]
steps = 3
batch_size = 8
warmup_steps = 0
threads = 1
out_dir = "{out}"
{export}
[{method}]
base_checkpoint = "{base}"
{knobs}
"""


def train_on_dit(tmp_path, base, method: str, export=None, knobs: str = ""):
    """A 3-step training config of `method` on the DiT `base` (its path); exported to `export` when given."""
    path = tmp_path / "train.toml"
    path.write_text(TRAIN_ON_DIT.format(out=tmp_path / "run", export=f'export = "{export}"' if export else "",
                                        method=method, base=base, knobs=knobs))
    return path


@pytest.mark.parametrize("estimator", ["official", "probe"])
def test_adadiff_trains_on_a_dit_and_keeps_the_contracts(tmp_path, estimator):
    """UAL training on a DiT base (its estimators only: the backbone stays frozen), then sampling with exits."""
    from adadiff_bench.methods.adadiff import load_adadiff
    base, model = dit_base(tmp_path)
    config = train_on_dit(tmp_path, base, "adadiff", knobs=f'estimator = "{estimator}"')
    check_method_contracts("adadiff", model, {"train": str(config), "threshold": 0.5},
                           training_cache=tmp_path / "cache")
    trained, = (tmp_path / "cache").glob(f"{estimator}-official-frozen-*/weights.pt")
    trained_state, base_state = load_adadiff(trained).backbone.state_dict(), model.state_dict()
    # frozen: the trained file's backbone is the base, weight for weight (exported in half precision)
    assert all(torch.equal(trained_state[key], value.half().float()) for key, value in base_state.items())


@pytest.mark.parametrize("change, message", [({"backbone": "resnet"}, "`backbone` is 'resnet'"),
                                             ({"model": {**TINY_DIT, "num_layers": 10 ** 8}}, "layers but its state")])
def test_a_hostile_adadiff_file_on_a_dit_is_refused_in_one_line(tmp_path, change, message):
    from adadiff_bench.config import DiTConfig
    from adadiff_bench.errors import UserError
    from adadiff_bench.methods.adadiff import AdaDiffConfig, AdaDiffNetwork, load_adadiff, save_adadiff
    save_adadiff(tmp_path / "adadiff.pt", AdaDiffNetwork(tiny_dit(), AdaDiffConfig()), DiTConfig(**TINY_DIT))
    payload = torch.load(tmp_path / "adadiff.pt", weights_only=True)
    torch.save({**payload, **change}, tmp_path / "hostile.pt")
    with pytest.raises(UserError, match=message) as caught:
        load_adadiff(tmp_path / "hostile.pt")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("method", ["ase", "berxit", "l2c"])
def test_a_prefix_or_cache_method_trains_on_a_dit_and_keeps_the_contracts(tmp_path, method):
    """ASE's fine-tune, BERxiT's regressor and L2C's router, each trained (3 steps) on a DiT base, then sampled."""
    from adadiff_bench.training import load_train_config, train
    base, model = dit_base(tmp_path)
    trained = train(load_train_config(train_on_dit(tmp_path, base, method, tmp_path / "trained.pt")), progress=False)
    check_method_contracts(method, model, {"checkpoint": str(trained)})


def test_duodiff_switches_to_a_shallow_dit(tmp_path):
    from adadiff_bench.training import load_train_config, train
    _, model = dit_base(tmp_path)
    path = tmp_path / "shallow.toml"
    path.write_text(TRAIN_TINY_DIT.format(classes=10, out_dir=tmp_path / "run", export=tmp_path / "shallow.pt"))
    check_method_contracts("duodiff", model, {"shallow": str(train(load_train_config(path), progress=False))})


def test_l2c_on_a_dit_costs_partly_cached_blocks_as_the_dispatcher_does(tmp_path):
    """With the threshold at the router's median score, some blocks run one branch and reuse the other: they
    pay their adaLN modulation and the branch that runs, and the step log still equals the dispatcher's count."""
    from adadiff_bench.checkpoints import load_checkpoint
    from adadiff_bench.training import load_train_config, train
    base, model = dit_base(tmp_path)
    router = load_checkpoint(train(load_train_config(train_on_dit(tmp_path, base, "l2c", tmp_path / "router.pt")),
                                   progress=False), "adadiff-bench/l2c-router")
    cache_steps = router.beta[1::2]
    threshold = float(cache_steps.median())
    runs = cache_steps > threshold
    assert (runs.any(-1) & ~runs.all(-1)).any()  # at least one block runs one branch and reuses the other
    check_method_contracts("l2c", model, {"checkpoint": str(tmp_path / "router.pt"), "threshold": threshold})


# ---- the DiT paper's sampler: DDPM with the learned variance (learned_range) ---------------------------------

def dit_paper_sampler(transformer, num_samples: int, num_steps: int, seed: int, scale: float, channels: int):
    """DiT's own evaluation, written independently: diffusers' DDPMScheduler(variance_type="learned_range")
    stepping the untouched transformer's output, guided as DiT's forward_with_cfg (the first `channels` channels,
    the conditional pass's variance), with the suite's per-sample noise, labels and step noise."""
    from diffusers import DDPMScheduler
    from adadiff_bench.diffusion import initial_noise, sample_generators, sample_labels
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", variance_type="learned_range", clip_sample=False,
                              timestep_spacing="linspace")
    scheduler.set_timesteps(num_steps)
    generators = sample_generators(seed, range(num_samples))
    x = initial_noise(generators, (4, 8, 8))
    y = sample_labels(generators, 10)
    for t in scheduler.timesteps:
        times = t.expand(num_samples)
        eps_c, variance = transformer(x, timestep=times, class_labels=y).sample.chunk(2, dim=1)
        eps_u = transformer(x, timestep=times, class_labels=torch.full_like(y, 10)).sample.chunk(2, dim=1)[0]
        eps = eps_u + scale * (eps_c - eps_u)
        eps = torch.cat([eps[:, :channels], eps_c[:, channels:]], dim=1)
        x = scheduler.step(torch.cat([eps, variance], dim=1), t, x, generator=generators).prev_sample
    return x


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [3, 2])
def test_the_learned_variance_sampler_equals_diffusers_learned_range_ddpm_on_dit_outputs(batch_size):
    from adadiff_bench.harness import Cell, generate
    model = tiny_dit(std=0.05, in_channels=4, out_channels=8)
    cell = Cell("full", (), "ddpm-learned", 4, 0, guidance=1.5, guidance_channels=3)
    ours, _ = generate(cell, model, 3, batch_size)
    theirs = dit_paper_sampler(untouched_diffusers(model, in_channels=4, out_channels=8), 3, 4, 0, 1.5, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # (float32 rounding of large random values)
    fixed, _ = generate(Cell("full", (), "ddpm", 4, 0, guidance=1.5, guidance_channels=3), model, 3, 3)
    assert (fixed - ours).abs().max() > 1e-3  # the learned variance changed the samples: it was used


def adm_respaced_timesteps(num_train: int, count: int) -> list[int]:
    """ADM's respacing for one section (guided-diffusion's space_timesteps, which DiT's create_diffusion uses):
    a float index advanced by a stride of (T - 1) / (count - 1) from 0, each visit rounded; latest first."""
    stride, index, taken = (num_train - 1) / (count - 1), 0.0, []
    for _ in range(count):
        taken.append(round(index))
        index += stride
    return sorted(taken, reverse=True)


@pytest.mark.parametrize("num_steps", [250, 100, 4])
def test_the_learned_variance_sampler_visits_adms_respaced_timesteps(num_steps):
    from adadiff_bench.diffusion import solver_timesteps
    assert solver_timesteps("ddpm-learned", num_steps).tolist() == adm_respaced_timesteps(1000, num_steps)


@torch.no_grad()
def test_exits_hand_the_sampler_the_variance_of_the_head_each_sample_left_by():
    """Row 0 runs every block, rows 1-3 leave after block 1: row 0's variance is the full depth's (diffusers'
    own output), the others' their exit head's."""
    from adadiff_bench.harness import Cell, generate
    from adadiff_bench.models import variance
    model = tiny_dit(std=0.05, in_channels=4, out_channels=8)
    x, t, y = inputs(channels=4)
    sink = variance.VarianceSink(len(x))
    with variance.collecting(sink):
        tokens, state = model.begin(x, t, y)
        tokens = model.run_block(0, tokens, state)
        leaving, staying = torch.tensor([1, 2, 3]), torch.tensor([0])
        model.head(tokens[leaving], state.subset(leaving))
        deep, deep_state = tokens[staying], state.subset(staying)
        for block in (1, 2):
            deep = model.run_block(block, deep, deep_state)
        model.head(deep, deep_state)
    full = untouched_diffusers(model, in_channels=4, out_channels=8)(x, timestep=t, class_labels=y).sample[:, 4:]
    torch.testing.assert_close(sink.read()[0], full[0], rtol=1e-5, atol=1e-5)
    assert (sink.read()[1:] - full[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the exit's, not full depth's
    images, log = generate(Cell("static-exit", (("k", 2),), "ddpm-learned", 3, 0), model, 2, 2)
    assert torch.isfinite(images).all() and log.layer_ratio() < 1


def test_the_learned_variance_sampler_refuses_a_network_without_a_variance_in_one_line(tmp_path):
    from adadiff_bench.errors import UserError
    from adadiff_bench.harness import check_learned_variance
    from adadiff_bench.testing import tiny_backbone
    for model in (tiny_backbone(), tiny_dit()):
        with pytest.raises(UserError, match="predicts none") as caught:
            check_learned_variance("ddpm-learned", model, "methods[0]")
        assert "\n" not in str(caught.value)
    check_learned_variance("ddpm-learned", tiny_dit(in_channels=4, out_channels=8), "methods[0]")
