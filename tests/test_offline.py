"""Without a network: the real tfds builder path imports everything it needs and fails on the network
alone, in one line with offline advice; hub weights fail in seconds (or honour HF_HUB_OFFLINE)."""
import ipaddress
import socket
import time

import pytest

from backbones import WeightsError, create_backbone
from vtab_lily.prepare import PrepareError, main, prepare_task


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup fails at once, as on a machine without a network (numeric addresses still work)."""
    lookup = socket.getaddrinfo

    def fail(host, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (no network in this test)") from None
        return lookup(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", fail)


def test_real_tfds_download_path_fails_only_on_the_network(tmp_path, no_network, monkeypatch):
    """cifar100 through tfds' real (non-mock) builder: its download_and_prepare runs up to the download
    itself, so a missing module (importlib_resources, array_record, ...) would surface here first."""
    downloader = pytest.importorskip("tensorflow_datasets.core.download.downloader")
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # tfds retries 10 times with back-off (~3.5 min)
    monkeypatch.setattr("vtab_lily.prepare.reachable", lambda url: True)  # past our own probe
    with pytest.raises(PrepareError) as e:
        prepare_task("cifar100", tmp_path / "vtab", data_dir=str(tmp_path / "tfds"))
    message = e.value.args[0]
    assert message.startswith("cifar100: downloading cifar100:3.*.* failed: ConnectionError")
    assert "\n" not in message and "--data-dir" in message and "community VTAB-1K folder" in message
    assert not (tmp_path / "vtab" / "cifar100" / "manifest.json").exists()


def test_prepare_without_network_says_so_in_seconds(tmp_path, no_network, capsys):
    pytest.importorskip("tensorflow_datasets")
    start = time.perf_counter()
    assert main(["--task", "cifar100", "--root", str(tmp_path / "vtab"), "--data-dir", str(tmp_path / "tfds")]) == 2
    assert time.perf_counter() - start < 10
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("error: cifar100: no network (cannot reach www.cs.toronto.edu) and tfds has not "
                              "prepared cifar100 3.0.2 in " + str(tmp_path / "tfds"))
    assert "prepare --task cifar100 --root DIR" in out.err and not (tmp_path / "vtab").exists()


@pytest.mark.slow
@pytest.mark.parametrize("offline_env", [False, True])
def test_hub_weights_offline_fail_in_seconds(offline_env, no_network, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env)  # what HF_HUB_OFFLINE=1 sets at import
    for name, expect in (("vit-b", "ViT-B_16.npz"), ("vim-s", "vim_s_midclstok_80p5acc.pth")):
        start = time.perf_counter()
        with pytest.raises(WeightsError) as e:
            create_backbone(name, 10)
        assert time.perf_counter() - start < 15  # was ~50 s (ViT) and ~24 s (Vim) of hub retries
        why = "HF_HUB_OFFLINE is set" if offline_env else "no network: cannot reach https://huggingface.co"
        assert why in e.value.args[0] and expect in e.value.args[0] and "--weights PATH" in e.value.args[0]
    assert constants.HF_HUB_OFFLINE is offline_env  # restored


def test_run_without_network_fails_on_hub_weights_in_seconds(tmp_path, no_network, capsys):
    from vtab_lily import run
    prepare_task("digits", tmp_path / "data", limit=4)
    capsys.readouterr()
    start = time.perf_counter()
    assert run.main(["--backbone", "vit-b", "--task", "digits", "--data-root", str(tmp_path / "data"),
                     "--runs", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert time.perf_counter() - start < 20
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network: cannot reach https://huggingface.co" in err and "--weights" in err


def test_probe_goes_through_a_proxy_when_one_is_set(no_network, monkeypatch):
    from backbones.hub import reachable
    with socket.create_server(("127.0.0.1", 0)) as proxy:  # a local port that accepts connections
        for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        assert not reachable("https://huggingface.co", timeout=1)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        assert reachable("https://huggingface.co", timeout=1)
        monkeypatch.setenv("no_proxy", "huggingface.co")
        assert not reachable("https://huggingface.co", timeout=1)
