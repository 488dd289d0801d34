"""Tuned kernel configs on disk, per GPU model: round trip, refusal of another GPU's or a damaged file,
only curated candidates adopted, the launchers' loader never fatal, `eqat tune` without a GPU."""
import json

import pytest
import torch

from eqat_kernels.triton_kernels import configs, tuning
from eqat_train import cli
from test_fuzz_readers import assert_clean

GPU = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def table(monkeypatch, tmp_path):
    """An empty tuned table and a private cache folder; the process's table is restored afterwards."""
    monkeypatch.setenv("EQAT_CACHE", str(tmp_path))
    saved = configs.tuned()
    configs.forget_tuned()
    yield tmp_path
    configs.forget_tuned()
    for key, cfg in saved.items():
        configs.record_tuned(key, cfg)


def _tune_one() -> tuple[str, configs.KernelConfig]:
    """A winner that is not the curated default, as warmup would record it for a 4096 x 4096 w4g128 layer."""
    key = configs.bucket_key("decode", 1, 4096, 4096, 4, 128)
    winner = configs.candidates("decode", 1, False, 4)[1]
    configs.record_tuned(key, winner)
    return key, winner


def test_saved_winners_are_adopted_by_a_new_process(table):
    key, winner = _tune_one()
    path = tuning.save_tuned(tuning.tuned_path(GPU), GPU)
    assert path == table / "tuned" / "nvidia-h100-80gb-hbm3.json"
    configs.forget_tuned()
    assert configs.select_config("decode", 1, 4096, 4096, 4, 128) != winner  # the curated default
    assert tuning.load_for_gpu(GPU) == 1
    assert configs.select_config("decode", 1, 4096, 4096, 4, 128) == winner
    assert configs.select_config("decode", 1, 4096, 4096, 2, 64) == configs.candidates("decode", 1, False, 2)[0]


def test_another_gpus_file_and_foreign_entries_are_refused(table):
    key, winner = _tune_one()
    path = tuning.save_tuned(table / "t.json", GPU)
    configs.forget_tuned()
    with pytest.raises(ValueError, match="tuned on 'NVIDIA H100 80GB HBM3', not on 'NVIDIA A100"):
        tuning.load_tuned(path, "NVIDIA A100-SXM4-80GB")
    payload = json.loads(path.read_text())
    payload["configs"][key]["block_n"] = 512  # a tile no eqat version built and checked
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="not one of this version's candidates"):
        tuning.load_tuned(path, GPU)
    payload["configs"] = {"gemm|m16|n4096|k4096|b4|g128": configs.candidates("gemm", 16, False, 4)[0],
                          "bogus": {"block_m": 1}}
    path.write_text(json.dumps(payload, default=lambda c: c.__dict__))
    with pytest.raises(ValueError, match="'bogus' is not a tuned kernel config"):
        tuning.load_tuned(path, GPU)
    assert configs.tuned() == {}  # nothing adopted from a file that is not valid as a whole


def test_damaged_tuned_file_raises_value_error_or_loads(table):
    _tune_one()
    path = tuning.save_tuned(table / "t.json", GPU)
    assert_clean(lambda: tuning.load_tuned(path, GPU), path, path.read_bytes())


def test_launchers_skip_a_damaged_file_with_a_warning(table):
    _tune_one()
    path = tuning.save_tuned(tuning.tuned_path(GPU), GPU)
    configs.forget_tuned()
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(UserWarning, match="ignoring tuned kernel configs: .*re-run `eqat tune`"):
        assert tuning.load_for_gpu(GPU) == 0
    assert configs.tuned() == {}
    assert tuning.load_for_gpu("NVIDIA A100-SXM4-80GB") == 0  # no file: the curated defaults


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tune_command_without_a_gpu_says_so(capsys, tmp_path):
    assert cli.main(["tune", str(tmp_path)]) == 2
    assert "tuning times the Triton kernels on a GPU and this machine has none" in capsys.readouterr().err
