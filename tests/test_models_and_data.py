"""Model loading and block discovery across families; text windows and their splits."""
import json

import pytest
import torch

from eqat_train import data, models
from helpers import TINY_CONFIGS, build_tiny_model_dir


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_blocks_found_generically(family, tmp_path):
    folder = build_tiny_model_dir(tmp_path / family, family)
    model, tokenizer, source = models.load_model(str(folder))
    assert source.kind == "folder"
    name, blocks = models.find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = models.block_linears(blocks[0])
    assert len(linears) >= 4, (family, list(linears))
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())


def test_gpt2_conv1d_becomes_an_equivalent_linear(tmp_path):
    folder = build_tiny_model_dir(tmp_path / "gpt2", "gpt2")
    model, _, _ = models.load_model(str(folder))
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        for block in models.find_blocks(model)[1]:
            models.block_linears(block)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_model_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_source(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        models.resolve_source(str(fake))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        models.resolve_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a .gguf file, a model folder, or a Hub id"):
        models.resolve_source(str(tmp_path / "no" / "such" / "model"))
    assert models.resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_default_model_is_the_embedded_gguf():
    source = models.resolve_source(None)
    assert source.kind == "gguf" and source.gguf_file.endswith(".gguf")


def test_windows_do_not_overlap_and_split_is_disjoint():
    tok = type("T", (), {"__call__": lambda self, text, **k: type("E", (), {"input_ids": torch.arange(1000)[None]})()})()
    windows = data.tokenize_windows(tok, "x", 64)
    assert windows.shape == (15, 64) and torch.equal(windows.flatten(), torch.arange(960))
    split = data.split_windows(windows, n_eval=4, n_calib=8, n_val=2, seed=1)
    assert torch.equal(split.eval, windows[:4])
    starts = {int(w[0]) for w in torch.cat([split.calib, split.val])}
    assert len(starts) == 10 and min(starts) >= 4 * 64
    with pytest.raises(ValueError, match="without overlap"):
        data.split_windows(windows, n_eval=10, n_calib=8)


def test_text_sources(tmp_path):
    assert len(data.load_text(None)) > 400_000
    (tmp_path / "a.txt").write_text("hello world")
    assert data.load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert data.load_text(str(tmp_path / "b.jsonl")) == "one\n\np\nr"
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        data.load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        data.load_text(str(tmp_path / "missing.txt"))


def test_too_short_text_names_the_problem():
    tok = type("T", (), {"__call__": lambda self, text, **k: type("E", (), {"input_ids": torch.arange(10)[None]})()})()
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        data.tokenize_windows(tok, "short", 64)


def test_generate_hands_the_lm_head_a_contiguous_input(tiny_model_dir, tiny_packed_dir):
    """generate's prefill slices the last position; a strided head input makes torch's CPU matmul broadcast
    the head weight over the batch (3.6 GB at batch 64 on SmolLM2). Loaded models fold it back."""
    from eqat_train.checkpoint import load_quantized

    for model in (models.load_model(str(tiny_model_dir))[0], load_quantized(tiny_packed_dir, dtype=torch.float32)[0]):
        seen = []
        model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        prompts = torch.randint(3, 50, (3, 6))
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
        assert seen and all(seen)
