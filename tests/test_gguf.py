"""GGUF export: Q4_1 blocks equal eqat's weights, the file loads in transformers and in the gguf package,
a GGUF-sourced checkpoint keeps its source's metadata, and unsupported models are refused."""
import json

import gguf
import numpy as np
import pytest
import torch

from eqat_kernels import QuantLinear
from eqat_kernels.spec import QuantSpec
from eqat_train.checkpoint import load_quantized
from eqat_train.cli import main as cli_main
from eqat_train.gguf_export import q4_1_blocks
from helpers import run_quantize
from helpers import build_tiny_model_dir, random_packed

TINY = dict(seq_len=32, calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[], e2e=None)


def _fp16_bound(layer: QuantLinear) -> torch.Tensor:
    """Q4_1 stores m = -s*z in fp16: the only rounding, at most half an fp16 ulp of |s*z| per weight."""
    from eqat_kernels.packing import unpack_qzeros

    z = unpack_qzeros(layer.qzeros, layer.spec.bits, layer.out_features).float()
    return (layer.scales.float() * z).abs().max() * 2.0 ** -11 + 1e-7


@pytest.mark.parametrize("bits,group,k", [(2, 64, 96), (3, 32, 64), (4, 128, 320), (4, -1, 160), (2, 32, 32)])
def test_q4_1_blocks_dequantize_to_eqat_weights(bits, group, k):
    """Random codes, odd shapes (partial last group, per-channel): gguf's own dequantizer gives our weights."""
    n = 96
    layer = QuantLinear(k, n, bits, group, bias=False)
    qweight, qzeros, scales = random_packed(QuantSpec(bits, group, k, n))
    layer.load_state_dict({"qweight": qweight, "qzeros": qzeros, "scales": scales})
    blocks = q4_1_blocks(layer)
    assert blocks.shape == (n, k // 32 * 20)
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).reshape(n, k)
    expected = layer.dequantize(torch.float64).numpy()
    assert np.abs(w - expected).max() <= _fp16_bound(layer).item()


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    ckpt = root / "w3g32"
    run_quantize(model=str(tiny_model_dir), out=str(ckpt), method="rtn", bits=3, group_size=32, **TINY)
    out = root / "out" / "tiny-w3g32.gguf"
    assert cli_main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 0
    return ckpt, out


def test_exported_file_loads_in_transformers_with_the_same_weights_and_logits(exported):
    import transformers

    ckpt, out = exported
    ours, tok = load_quantized(ckpt, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    state = theirs.state_dict()
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):  # q/k rows went through llama.cpp's permutation and back
            assert (state[name + ".weight"] - m.dequantize(torch.float32)).abs().max() <= _fp16_bound(m)
    assert torch.equal(state["model.embed_tokens.weight"], ours.model.embed_tokens.weight)
    text = "def f(x): return x"
    ids = tok(text, return_tensors="pt").input_ids
    their_tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert their_tok(text, add_special_tokens=False).input_ids == ids[0].tolist()
    for m in ours.modules():
        if isinstance(m, QuantLinear):
            m.backend = "reference"  # exact fp32 (the CPU int4 kernel computes in bf16)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 2e-3  # m's fp16 rounding only (7e-4 measured here)


def test_checkpoint_from_a_gguf_source_exports_with_the_sources_metadata(exported, tmp_path):
    """GGUF in (the exported file as a source model), quantize, GGUF out: metadata copied field by field."""
    _, source = exported
    ckpt = tmp_path / "from-gguf"
    run_quantize(model=str(source), out=str(ckpt), method="rtn", bits=4, group_size=32, **TINY)
    out = tmp_path / "again.gguf"
    assert cli_main(["export", str(ckpt), "--out", str(out)]) == 0
    a, b = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count", "llama.attention.head_count_kv"):
        assert a.fields[key].contents() == b.fields[key].contents()
    assert b.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    # the F32 embedding of the source dequantizes to exactly the checkpoint's: its bytes are copied
    emb = {t.name: t for t in b.tensors}["token_embd.weight"]
    assert emb.tensor_type == {t.name: t for t in a.tensors}["token_embd.weight"].tensor_type


def test_architectures_gguf_cannot_express_are_refused(tmp_path, capsys):
    model_dir = build_tiny_model_dir(tmp_path / "gpt2", "gpt2")
    ckpt = tmp_path / "gpt2-rtn"
    run_quantize(model=str(model_dir), out=str(ckpt), method="rtn", bits=4, group_size=32, **TINY)
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "GGUF export supports ['llama', 'mistral', 'qwen2'] models; 'gpt2'" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "gpt2"
    model, _ = load_quantized(ckpt)  # GPT-2's Conv1D layers come back as QuantLinears
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)


def test_codes_wider_than_a_nibble_are_refused(tiny_model_dir, tmp_path, capsys):
    """An 8-bit checkpoint cannot be Q4_1: refused by name, no file (its codes would be OR-ed into nibbles)."""
    ckpt = tmp_path / "w8"
    run_quantize(model=str(tiny_model_dir), out=str(ckpt), method="rtn", bits=8, group_size=32, **TINY)
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "8-bit codes, which Q4_1 cannot hold" in err
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ValueError, match="8-bit codes"):
        q4_1_blocks(load_quantized(ckpt)[0].model.layers[0].mlp.down_proj)
