"""Checkpoints refuse what does not match their config; offloaded activations change nothing; generation runs."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eqat_train.checkpoint import load_quantized
from eqat_train.cli import main as cli_main
from helpers import run_quantize

TINY = dict(bits=3, group_size=32, seq_len=32, calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[])


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "rtn"
    run_quantize(model=str(tiny_model_dir), out=str(out), method="rtn", **TINY)
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


@pytest.mark.parametrize("method", ["rtn", "gptq", "block_ap"])
def test_offloaded_activations_give_the_same_checkpoint(tiny_model_dir, tmp_path, method):
    """--offload memory-maps the block activations in the run's .partial folder (which a fresh run has not made
    yet): the same checkpoint as in RAM, for a data-free method and for the two that keep activations."""
    ram, disk = tmp_path / "ram", tmp_path / "disk"
    run_quantize(model=str(tiny_model_dir), out=str(ram), method=method, e2e=None, **TINY)
    run_quantize(model=str(tiny_model_dir), out=str(disk), method=method, e2e=None, offload=True, **TINY)
    a, b = load_file(ram / "model.safetensors"), load_file(disk / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_from_a_checkpoint(checkpoint, capsys):
    assert cli_main(["generate", str(checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_saved_config_equals_the_source_and_plain_generate_uses_the_cache(tiny_model_dir, checkpoint):
    """Whatever training turns off (use_cache, dtype...) is the source's again in the saved folder, so a
    user's plain `model.generate(ids)` decodes with the KV cache."""
    from transformers import AutoConfig, GenerationConfig

    src = json.loads((tiny_model_dir / "config.json").read_text())
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved.pop("quantization_config")["checkpoint_format"] == "gptq_v2"
    volatile = {"_name_or_path", "transformers_version"}
    assert {k: (src.get(k), saved.get(k)) for k in set(src) | set(saved)
            if k not in volatile and src.get(k) != saved.get(k)} == {}
    assert AutoConfig.from_pretrained(checkpoint).use_cache is True
    src_gen = GenerationConfig.from_pretrained(tiny_model_dir).to_diff_dict()
    saved_gen = GenerationConfig.from_pretrained(checkpoint).to_diff_dict()
    assert {k: v for k, v in saved_gen.items() if k not in volatile} == {k: v for k, v in src_gen.items() if k not in volatile}

    model, tok = load_quantized(checkpoint)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids = tok("def f(x):", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert seen == [ids.shape[1]] + [1] * 5  # prompt once, then one token per step: the cache is used


def test_load_quantized_defaults_to_the_fast_dtype_and_takes_an_override(checkpoint):
    from eqat_train.checkpoint import default_dtype

    model, _ = load_quantized(checkpoint)
    assert default_dtype() == torch.bfloat16  # no CUDA here
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    model32, _ = load_quantized(checkpoint, dtype=torch.float32)
    assert model32.get_input_embeddings().weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be 'auto'"):
        load_quantized(checkpoint, dtype="fp8")
