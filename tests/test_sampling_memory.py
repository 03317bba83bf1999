"""The memory check before sampling: a pixel model is sized by its output, a latent model by its latents (4 x 32 x
32) plus the decode stage's images (3 x 256 x 256); a run that cannot fit stops with one line before anything is
written."""
from __future__ import annotations

import pytest

from adadiff_bench import harness, memory
from adadiff_bench.checkpoints import build_model
from adadiff_bench.cli import main
from adadiff_bench.errors import UserError
from adadiff_bench.memory import check_sampling_memory, sampling_bytes
from adadiff_bench.models.official import decoded_values
from adadiff_bench.models.presets import PRESETS
from test_presets import shallow_presets  # noqa: F401 (a fixture)

GIB = 2 ** 30


def held_bytes(num_samples, num_steps, num_blocks, network_shape, image_shape=None) -> int:
    """What a cell holds, tensor by tensor (sizes in bytes), written out from what the harness keeps alive."""
    def values(shape):
        count = 1
        for n in shape:
            count *= n
        return count

    step_log = num_samples * num_steps * (num_blocks * 1 + 3 * 2 + 8)   # bool per block, three int16, a float64
    if image_shape is None:
        pixels = num_samples * values(network_shape)
        return step_log + pixels * (4 + 4 + 4 + 1)                       # batches, concatenation, NaN-free, uint8
    latents = num_samples * values(network_shape)
    pixels = num_samples * values(image_shape)
    return step_log + latents * (4 + 4) + pixels * 1                   # latent batches + concatenation; uint8 images


@pytest.mark.parametrize("case", [
    (50_000, 50, 13, (4, 32, 32), (3, 256, 256)),   # ImageNet / MS-COCO 256 latents, SD decoder
    (1_000, 1000, 13, (3, 32, 32), None),           # CIFAR-10 pixels
    (7, 3, 5, (1, 8, 8), None),                      # the digits
])
def test_sampling_bytes_count_every_tensor_a_cell_holds(case):
    num_samples, num_steps, num_blocks, network_shape, image_shape = case
    network_values = network_shape[0] * network_shape[1] * network_shape[2]
    image_values = None if image_shape is None else image_shape[0] * image_shape[1] * image_shape[2]
    assert sampling_bytes(num_samples, num_steps, num_blocks, network_values, image_values) == \
        held_bytes(num_samples, num_steps, num_blocks, network_shape, image_shape)


def test_a_latent_run_is_sized_by_its_decoded_images_not_its_latents_alone():
    latent, decoded = 4 * 32 * 32, 3 * 256 * 256
    latent_only = sampling_bytes(50_000, 50, 13, latent)
    total = 8 * GIB
    assert latent_only < total  # sized by the latents alone, 50,000 samples would pass on 8 GiB ...
    with pytest.raises(UserError, match=r"50000 samples at 50 steps need about 11 GiB for their latents, decoded "
                                        r"images and step log, more than this machine's 8 GiB") as error:
        check_sampling_memory(50_000, 50, 13, latent, decoded, "run.toml", total=total)  # ... not with the decoder's
    assert len(str(error.value).splitlines()) == 1
    check_sampling_memory(1_000, 50, 13, latent, decoded, "run.toml", total=total)  # 1,000 fit: 0.2 GiB


def test_decoded_values_are_the_latent_presets_rgb_images():
    config = type("Run", (), {})()
    for name, preset in PRESETS.items():
        config.model = type("Model", (), {"preset": name})()
        assert decoded_values(config) == (3 * 256 * 256 if preset.latent else None)
    config.model = type("Model", (), {"preset": ""})()
    assert decoded_values(config) is None


def test_a_latent_run_too_large_for_memory_stops_before_anything_is_written(shallow_presets, tmp_path, monkeypatch,
                                                                            capsys):
    name = "imagenet256_uvit_l2"
    for file in ("nnet_ema.pth", "autoencoder_kl.pth"):
        (tmp_path / file).touch()  # present; the network below stands in for the release
    monkeypatch.setattr(harness, "load_run_model", lambda config, where: build_model(PRESETS[name].network).eval())
    monkeypatch.setattr(memory, "machine_memory_bytes", lambda: 2 * GIB)
    config = tmp_path / "run.toml"
    config.write_text(f'name = "big"\nresults_dir = "{tmp_path / "results"}"\n[model]\npreset = "{name}"\n'
                      f'checkpoint = "{tmp_path / "nnet_ema.pth"}"\nautoencoder = "{tmp_path / "autoencoder_kl.pth"}"\n'
                      '[sampling]\nschedule = "vp"\nsolver = "dpm-solver-fast"\nnum_steps = 3\nnum_samples = 20000\n'
                      '[metrics]\ninception = "off"\n[timing]\nenabled = false\n[[methods]]\nname = "full"\n')
    # 20,000 latents of 4 x 32 x 32 alone would take 0.6 GiB; with their uint8 3 x 256 x 256 images, 4.3 GiB
    assert sampling_bytes(20000, 3, 5, 4 * 32 * 32) < 2 * GIB < sampling_bytes(20000, 3, 5, 4 * 32 * 32, 3 * 256 * 256)
    assert main(["run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "20000 samples at 3 steps need about 4 GiB for their latents, decoded images and step log" in error
    assert not (tmp_path / "results").exists()
