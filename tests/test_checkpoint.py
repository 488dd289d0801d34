"""Checkpoints refuse what does not match their config; offloaded activations change nothing; generation runs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eqat_train.checkpoint import load_quantized
from eqat_train.cli import main as cli_main
from eqat_train.pipeline import QuantizeOptions, quantize

TINY = dict(bits=3, group_size=32, seq_len=32, calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[])


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    quantize(QuantizeOptions(model=str(tiny_model_dir), out=str(out), method="rtn", **TINY), progress=False)
    return out


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint, dst)
    return dst


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _edit_tensors(folder, lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"))
    with pytest.raises(ValueError, match="missing model.layers.0.mlp.up_proj.qzeros"):
        load_quantized(folder)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _edit_tensors(folder, lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.scales", torch.ones(3, 64, dtype=torch.float16)))
    with pytest.raises(ValueError, match=r"q_proj.scales is torch.float16 \(3, 64\)"):
        load_quantized(folder)


def test_config_disagreeing_with_tensors(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bits=4, group_size=32"):
        load_quantized(folder)


def test_unknown_format_truncated_file_and_pickles_are_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint_format='marlin'"):
        load_quantized(folder)
    folder = _copy(checkpoint, tmp_path / "b")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_quantized(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_quantized(folder)


def test_offloaded_activations_give_the_same_checkpoint(tiny_model_dir, checkpoint, tmp_path):
    out = tmp_path / "offload"
    quantize(QuantizeOptions(model=str(tiny_model_dir), out=str(out), method="rtn", offload=True, **TINY), progress=False)
    a, b = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_from_a_checkpoint(checkpoint, capsys):
    assert cli_main(["generate", str(checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
