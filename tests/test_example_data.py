"""`adadiff-bench example-data`: colour PNGs made from the built-in digits, loadable as a folder data set, one
colour per image over the digit's own ink, and one-line refusals that write nothing."""
from __future__ import annotations

import numpy as np
from PIL import Image

from adadiff_bench.cli import main
from adadiff_bench.config import DataConfig
from adadiff_bench.data import _digits, load_dataset


def test_the_folder_loads_as_rgb_images_whose_ink_is_the_enlarged_digit_in_one_colour(tmp_path, capsys):
    out = tmp_path / "pngs"
    assert main(["example-data", str(out), "--size", "16", "--count", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"next: adadiff-bench init --data {out}"
    data = load_dataset(DataConfig("folder", str(out)))
    assert tuple(data.images.shape) == (20, 3, 16, 16) and data.labels is None
    digits = _digits()[0]
    for index in (0, 7, 19):
        enlarged = np.asarray(Image.fromarray(digits[index, ..., 0]).resize((16, 16), Image.BILINEAR), np.float64)
        image = data.images[index].numpy().astype(np.float64)
        brightest = enlarged.argmax()
        colour = image.reshape(3, -1)[:, brightest] / enlarged.flat[brightest]  # the ink's colour, per channel
        assert np.abs(image - enlarged[None] * colour[:, None, None]).max() <= 1.0  # (rounding to uint8)
        assert 0.3 < colour.min() and colour.max() <= 1.0 + 1e-2
    assert not list(tmp_path.glob(".*partial"))


def test_bad_arguments_and_an_existing_folder_are_one_line_and_write_nothing(tmp_path, capsys):
    for argv in (["--size", "4"], ["--size", "1000"], ["--count", "0"], ["--count", "5000"]):
        assert main(["example-data", str(tmp_path / "new"), *argv]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.png").write_bytes(b"mine")
    assert main(["example-data", str(tmp_path / "mine")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.png"]
