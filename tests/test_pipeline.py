"""End to end on a tiny local model: quantize -> save -> load -> eval, every method, resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from eqat_kernels import QuantLinear
from eqat_train import data, evaluate
from eqat_train.checkpoint import load_quantized
from eqat_train.cli import main as cli_main
from helpers import run_quantize

TINY = dict(bits=2, group_size=32, seq_len=32, calib_windows=8, val_windows=2, eval_windows=4,
            eval_texts=["stdlib"], epochs=2, lr_scale=20.0, lr_scale_quant=20.0)


@pytest.mark.parametrize("method", ["block_ap", "rtn", "gptq"])
def test_quantize_save_load_eval(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    results = run_quantize(model=str(tiny_model_dir), out=str(out), method=method, **TINY)
    assert len(results["blocks"]) == 4
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not out.with_name(out.name + ".partial").exists()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["checkpoint_format"] == "gptq_v2" and config["bits"] == 2 and config["group_size"] == 32
    assert config["sym"] is False and config["desc_act"] is False and config["eqat"]["method"] == method

    model, tokenizer = load_quantized(out, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 7 and all(m.is_packed for m in layers)
    windows = data.tokenize_windows(tokenizer, data.load_text(None), 32)[:4]
    reloaded = evaluate.perplexity(model, windows, progress=False)
    assert reloaded == pytest.approx(results["perplexity"]["stdlib"], rel=1e-3)


def test_block_ap_beats_the_minmax_start_and_never_ends_above_it(tiny_model_dir, tmp_path):
    """Held-out windows, packed weights: training beats the min-max (RTN) initialisation clearly on most blocks
    and on average, and a block whose held-out loss it does not lower keeps its start. (On 8 self-generated
    windows of a tiny random model one block in four may not improve on 2 held-out windows: the calibration
    sample comes from bf16 sampling, whose rounding differs between CPUs.)"""
    minmax = run_quantize(model=str(tiny_model_dir), out=str(tmp_path / "bap"), init="minmax", **TINY)["blocks"]
    for stats in minmax:
        assert stats["val_loss_packed"] <= stats["val_loss_init"] * (1 + 1e-4), stats
        if stats["kept_init"]:
            assert stats["val_loss_trained"] == stats["val_loss_init"], stats
    improved = [s for s in minmax if s["val_loss_packed"] < 0.9 * s["val_loss_init"]]
    assert len(improved) >= len(minmax) - 1, minmax
    assert sum(s["val_loss_packed"] for s in minmax) < 0.85 * sum(s["val_loss_init"] for s in minmax), minmax
    # The default init starts every block lower, and a block never ends above its own start.
    default = run_quantize(model=str(tiny_model_dir), out=str(tmp_path / "bap-default"), **TINY)["blocks"]
    assert default[0]["val_loss_init"] < minmax[0]["val_loss_init"]
    for stats in default:
        assert stats["val_loss_packed"] <= stats["val_loss_init"] * (1 + 1e-4), stats


def test_cli_eval_and_refusals(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--method", "rtn", "--bits", "3",
            "--group-size", "32", "--seq-len", "32", "--calib-windows", "4", "--val-windows", "0",
            "--eval-windows", "2", "--eval-texts", "stdlib"]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--windows", "2", "--seq-len", "32"]) == 0
    one = json.loads(capsys.readouterr().out)["fidelity"]
    assert one["texts"]["stdlib"]["kl"] > 0
    assert cli_main(["eval", str(out), str(out), "--windows", "2", "--seq-len", "32"]) == 0
    both = json.loads(capsys.readouterr().out)["fidelity"]
    assert both[str(out)]["texts"] == one["texts"]  # the shared fp pass gives each checkpoint its own numbers
    assert cli_main(args) == 2  # a finished checkpoint is never overwritten
    assert "already holds a finished checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _quantize_cmd(model_dir, out):
    return [sys.executable, "-m", "eqat_train.cli", "quantize", "--model", str(model_dir), "--out", str(out),
            "--bits", "2", "--group-size", "32", "--seq-len", "32", "--calib-windows", "16", "--val-windows", "2",
            "--eval-windows", "2", "--eval-texts", "stdlib", "--epochs", "3"]


def test_kill_9_then_rerun_resumes_and_matches(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "uninterrupted"
    subprocess.run(_quantize_cmd(tiny_model_dir, reference), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    progress = out.with_name(out.name + ".partial") / "progress.json"
    proc = subprocess.Popen(_quantize_cmd(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and 1 <= json.loads(progress.read_text())["blocks_done"] < 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["blocks_done"]
    assert 1 <= done < 4 and not (out / "model.safetensors").exists()

    # the closing report's window count is not part of the run: a rerun that changes it resumes
    rerun = subprocess.run(_quantize_cmd(tiny_model_dir, out) + ["--eval-windows", "3"], env=env, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_generate_and_chat_stream_greedy_text(tiny_packed_dir, capsys, monkeypatch):
    from eqat_train.generation import generate

    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    text = generate(model, tok, "The for statement", max_new_tokens=8)
    assert text and text == generate(model, tok, "The for statement", max_new_tokens=8)  # greedy: deterministic
    ids = tok("The for statement", return_tensors="pt").input_ids
    manual = ids
    with torch.no_grad():
        for _ in range(8):  # no KV cache, full recompute: generate's cached decode must agree
            manual = torch.cat([manual, model(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert tok.decode(manual[0, ids.shape[1]:], skip_special_tokens=True) == text
    assert cli_main(["generate", str(tiny_packed_dir), "--prompt", "The for statement", "--max-new-tokens", "8",
                     "--dtype", "float32"]) == 0
    assert text in capsys.readouterr().out
    lines = iter(["Hello", "How are you?", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert cli_main(["chat", str(tiny_packed_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_block_ap_init_default_and_choice():
    from eqat_train.block_ap import BlockAPConfig

    assert {BlockAPConfig(bits=b).init for b in (2, 3, 4)} == {"clip_act"}
    assert BlockAPConfig(bits=4, init="clip").init == "clip"
    with pytest.raises(ValueError, match="init must be one of"):
        BlockAPConfig(init="absmax")
