"""Faults: divergence is retried once at a lower learning rate then stopped with a message; a SIGKILL at
any named point (mid block checkpoint, mid E2E-QP state, mid final save) loses nothing: the rerun of the
same command ends with the same checkpoint as a run never interrupted, and an old checkpoint stays loadable."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eqat_train.block_ap as block_ap
import eqat_train.e2e_qp as e2e_qp
from eqat_train.checkpoint import load_quantized, save_quantized
from eqat_train.e2e_qp import E2EConfig, E2ETrainer
from eqat_train.examples import Examples
from helpers import run_quantize

TINY = dict(bits=2, group_size=32, seq_len=32, calib_windows=8, val_windows=0, eval_windows=2, eval_texts=[])


def _nan_on_calls(fn, bad_calls):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        out = fn(*args, **kwargs)
        if calls["n"] in bad_calls or "always" in bad_calls:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    return wrapped


def test_block_ap_divergence_restores_the_block_and_retries_at_lower_lr(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(block_ap, "block_loss", _nan_on_calls(block_ap.block_loss, {3}))
    res = run_quantize(model=str(tiny_model_dir), out=str(tmp_path / "a"), e2e=None, **TINY)
    assert [b["retried"] for b in res["blocks"]] == [True, False, False, False]
    assert all(torch.isfinite(torch.tensor(b["train_loss"])) for b in res["blocks"])
    assert "retrying at 0.1x the lr" in capsys.readouterr().out


def test_block_ap_that_diverges_twice_stops_with_a_message(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(block_ap, "block_loss", _nan_on_calls(block_ap.block_loss, {"always"}))
    with pytest.raises(FloatingPointError, match="block 0 diverged again at 0.1x the learning rate"):
        run_quantize(model=str(tiny_model_dir), out=str(tmp_path / "b"), e2e=None, **TINY)


def _trainer(tiny_packed_dir, steps=12):
    from eqat_train import data

    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    windows = data.tokenize_windows(tok, data.load_text(None), 32)[4:20]
    return E2ETrainer(model, Examples.from_windows(windows), E2EConfig(steps=steps, lr=1e-3, save_every=4, loss="ce"),
                      bf16=False)


def test_e2e_divergence_restores_the_last_saved_step_and_retries(tiny_packed_dir, monkeypatch):
    monkeypatch.setattr(e2e_qp, "token_loss_sum", _nan_on_calls(e2e_qp.token_loss_sum, {13}))  # step 7
    trainer = _trainer(tiny_packed_dir)
    log = trainer.train(progress=False)
    assert [r["step"] for r in log] == list(range(1, 13)) and trainer.lr_factor == pytest.approx(0.1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[4]["lr"] == pytest.approx(0.1 * trainer.cfg.lr * e2e_qp_lr_shape(trainer, 5), rel=1e-6)


def e2e_qp_lr_shape(trainer, step):
    import math

    warm = math.ceil(trainer.cfg.warmup * trainer.steps)
    if step < warm:
        return step / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / (trainer.steps - warm)))


def test_e2e_that_diverges_twice_stops_with_a_message(tiny_packed_dir, monkeypatch):
    monkeypatch.setattr(e2e_qp, "token_loss_sum", _nan_on_calls(e2e_qp.token_loss_sum, {"always"}))
    with pytest.raises(FloatingPointError, match="E2E-QP diverged again"):
        _trainer(tiny_packed_dir).train(progress=False)


def _cmd(model_dir, out):
    return [sys.executable, "-m", "eqat_train.cli", "quantize", "--model", str(model_dir), "--out", str(out),
            "--bits", "2", "--group-size", "32", "--seq-len", "32", "--calib-windows", "8", "--val-windows", "0",
            "--eval-windows", "2", "--eval-texts", "--epochs", "2", "--e2e-steps", "6", "--e2e-save-every", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    subprocess.run(_cmd(tiny_model_dir, out), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("point", ["block_checkpoint.tensors_written", "block_checkpoint.activations_written",
                                   "e2e_state.tensors_written", "save.model_written"])
def test_sigkill_at_a_crash_point_then_rerun_matches(tiny_model_dir, tmp_path, uninterrupted, point):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(_cmd(tiny_model_dir, out), capture_output=True, env={**env, "EQAT_CRASH_AT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "model.safetensors").exists()
    rerun = subprocess.run(_cmd(tiny_model_dir, out), capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    got = load_file(out / "model.safetensors")
    assert got.keys() == uninterrupted.keys()
    for key in got:
        assert torch.equal(got[key], uninterrupted[key]), key
    assert not list(tmp_path.glob(".run.tmp*"))  # the killed save's temporary folder was cleaned up


def test_sigkill_while_replacing_a_checkpoint_leaves_the_old_one_loadable(tiny_packed_dir, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_packed_dir, folder)
    script = ("import sys; from eqat_train.checkpoint import load_quantized, save_quantized, quantization_config;"
              "m, t = load_quantized(sys.argv[1]); save_quantized(m, t, sys.argv[1], quantization_config(2, 32))")
    for point in ("save.model_written", "save.old_moved_aside"):
        proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                              env={**os.environ, "EQAT_CRASH_AT": point})
        assert proc.returncode == -9, proc.stderr[-2000:]
        model, _ = load_quantized(folder)  # the previous checkpoint, complete
        assert json.loads((folder / "config.json").read_text())["quantization_config"]["bits"] == 2
    save_quantized(model, None, folder, json.loads((folder / "config.json").read_text())["quantization_config"])
    assert not list(tmp_path.glob(".ckpt.*"))
