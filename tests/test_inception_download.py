"""`[metrics] inception = "download"` and `--offline`: torch-fidelity's Inception file fetched into torch hub's
cache with a socket timeout and opened with weights_only=True before use; under --offline nothing connects.
No test touches the network: torch hub's download function is replaced by one that writes a generated file."""
from __future__ import annotations

import fractions
import shutil
import socket
import urllib.error

import pytest
import torch
import torch.hub
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

from adadiff_bench import cli
from adadiff_bench.cli import main
from adadiff_bench.config import MetricsConfig
from adadiff_bench.errors import UserError
from adadiff_bench.metrics.extractors import (DOWNLOAD_TIMEOUT_S, URL_INCEPTION_V3, default_inception_weights_path,
                                              inception_weights)
from adadiff_bench.metrics.quality import compute_quality
from adadiff_bench.offline import OfflineError, no_network
from conftest import write_run_config
from test_metrics import digits, empty_torch_home, random_inception_weights, subset  # noqa: F401 (fixtures)


class FakeDownload:
    """torch.hub.download_url_to_file that writes `source` (or raises `error`) and records each call's url and
    the socket default timeout in force during it."""

    def __init__(self, source: str | None = None, error: Exception | None = None):
        self.source, self.error, self.calls = source, error, []

    def __call__(self, url, dst, hash_prefix=None, progress=True):
        self.calls.append((url, socket.getdefaulttimeout()))
        if self.error is not None:
            raise self.error
        shutil.copyfile(self.source, dst)


def test_download_fills_the_hub_cache_with_a_timeout_and_the_metrics_use_it(digits, random_inception_weights,  # noqa: F811
                                                                            empty_torch_home, tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity_inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)  # speed only
    fake = FakeDownload(random_inception_weights)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    previous = socket.getdefaulttimeout()
    samples, reference = digits.images[100:116].roll(1, dims=3), subset(digits, slice(0, 32))
    options = dict(kid_subset_size=16, isc_splits=2, prc=False)
    downloaded = compute_quality(samples, reference, MetricsConfig(inception="download", **options),
                                 tmp_path / "a", extractors=("inception",))
    target = default_inception_weights_path()
    assert fake.calls == [(URL_INCEPTION_V3, DOWNLOAD_TIMEOUT_S)] and socket.getdefaulttimeout() == previous
    assert str(target).startswith(str(empty_torch_home)) and target.read_bytes() == open(random_inception_weights,
                                                                                         "rb").read()
    given = compute_quality(samples, reference, MetricsConfig(inception="require",
                                                              inception_weights=random_inception_weights, **options),
                            tmp_path / "b", extractors=("inception",))
    assert downloaded["fid_inception"] == given["fid_inception"] > 0
    assert inception_weights(MetricsConfig(inception="download")) == str(target) and len(fake.calls) == 1  # cached


def test_a_downloaded_file_that_is_not_plain_tensors_is_refused_and_removed(empty_torch_home, tmp_path,
                                                                            monkeypatch):
    hostile = tmp_path / "hostile.pth"
    torch.save({"weight": fractions.Fraction(1, 3)}, hostile)  # a pickled object weights_only=True refuses
    monkeypatch.setattr(torch.hub, "download_url_to_file", FakeDownload(str(hostile)))
    with pytest.raises(UserError, match="is not a file of plain tensors") as error:
        inception_weights(MetricsConfig(inception="download"))
    assert len(str(error.value).splitlines()) == 1
    assert not default_inception_weights_path().exists()  # "auto" will not find it later


def test_a_failed_download_is_one_line_and_restores_the_timeout(empty_torch_home, monkeypatch):
    fake = FakeDownload(error=urllib.error.URLError(TimeoutError("timed out")))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    previous = socket.getdefaulttimeout()
    with pytest.raises(UserError, match=r"could not download the Inception weights from .*timed out.*"
                                        r"--inception-weights PATH") as error:
        inception_weights(MetricsConfig(inception="download"))
    assert len(str(error.value).splitlines()) == 1 and fake.calls[0][1] == DOWNLOAD_TIMEOUT_S
    assert socket.getdefaulttimeout() == previous and not default_inception_weights_path().exists()


def test_offline_refuses_download_in_one_line(tmp_path, tiny_checkpoint, empty_torch_home, monkeypatch, capsys):
    fake = FakeDownload(error=AssertionError("nothing may be downloaded under --offline"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    config = write_run_config(tmp_path, tiny_checkpoint, metrics='inception = "download"')
    assert main(["--offline", "run", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and 'inception = "download" under --offline' in error
    assert fake.calls == [] and not (tmp_path / "results").exists() and not empty_torch_home.exists()


def test_a_connect_under_offline_raises_and_nothing_is_accepted():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        with no_network(), socket.socket() as client:
            with pytest.raises(OfflineError, match="--offline: refused a network connection"):
                client.connect(server.getsockname())
            with pytest.raises(ConnectionError):  # libraries that handle a failed connection see one
                socket.create_connection(server.getsockname())
            with pytest.raises(OfflineError):
                socket.getaddrinfo("localhost", 80)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection ever reached the listening socket
        with socket.create_connection(server.getsockname()):  # outside the block, connecting works again
            server.accept()[0].close()


def test_the_offline_flag_guards_the_whole_command(monkeypatch, capsys):
    def connecting_command(args):
        socket.create_connection(("192.0.2.1", 80), timeout=0.01)  # a documentation-only address
        return 0
    monkeypatch.setitem(cli.COMMANDS, "methods", connecting_command)
    connect, look_up = socket.socket.connect, socket.getaddrinfo
    assert main(["--offline", "methods"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--offline: refused a network connection to ('192.0.2.1', 80)" in error
    assert socket.socket.connect is connect and socket.getaddrinfo is look_up  # restored after the command
