"""Every kind of file eqat reads, truncated at many lengths and with flipped bytes: the reader either
succeeds (a flip inside tensor data or a string can be harmless) or raises a ValueError, never another
exception."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from eqat_train import data, models, runstate
from eqat_train.checkpoint import load_quantized
from eqat_train.examples import Examples
from helpers import run_quantize

TINY = dict(seq_len=32, calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[], e2e=None)
FLIPS = 12


def damaged_versions(raw: bytes, seed: int):
    """Truncations (empty, one byte, header-sized, fractions, one byte short) and single-byte flips,
    half of them inside the first 4 KiB where headers live."""
    rng = random.Random(seed)
    for n in sorted({0, 1, 4, 8, 24, 100, len(raw) // 7, len(raw) // 3, len(raw) // 2, len(raw) - 1}):
        if n < len(raw):
            yield f"truncated to {n}", raw[:n]
    for i in range(FLIPS):
        pos = rng.randrange(min(len(raw), 4096)) if i % 2 == 0 else rng.randrange(len(raw))
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << rng.randrange(8)
        yield f"bit flip at {pos}", bytes(flipped)


def assert_clean(read, path, raw: bytes, seed: int = 0):
    for what, damaged in damaged_versions(raw, seed):
        path.write_bytes(damaged)
        try:
            read()
        except ValueError:
            pass
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{path.name} {what}: {type(e).__name__}: {e}")
    path.write_bytes(raw)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "rtn"
    run_quantize(model=str(tiny_model_dir), out=str(out), method="rtn", bits=4, group_size=32, **TINY)
    return out


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    from eqat_train.gguf_export import export_checkpoint

    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("fuzz_gguf") / "tiny.gguf")


def test_gguf_model_files(gguf_file, tmp_path):
    path = tmp_path / "m.gguf"
    raw = gguf_file.read_bytes()
    assert_clean(lambda: models.resolve_source(str(path)), path, raw)
    # a header that parses must also load, or fail cleanly, in transformers (flips confined to the header)
    header = models.check_gguf(gguf_file).data_offset
    rng = random.Random(1)
    for _ in range(6):
        flipped = bytearray(raw)
        flipped[rng.randrange(header)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            models.load_model(str(path))
        except ValueError:
            pass


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_checkpoint_files(checkpoint, tmp_path, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    assert_clean(lambda: load_quantized(folder), folder / name, (folder / name).read_bytes())


def test_resume_state_files(tmp_path):
    fp = runstate.fingerprint({"bits": 2})
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"fingerprint": fp, "blocks_done": 3, "log": [{"block": 0, "loss": 0.5}]}))
    assert_clean(lambda: runstate.read_progress(progress, fp, {"blocks_done": int, "log": list}), progress,
                 progress.read_bytes())
    tensors = tmp_path / "block_0000.safetensors"
    runstate.atomic_save_tensors({"a.qweight": torch.arange(64, dtype=torch.int32).reshape(8, 8),
                                  "a.scales": torch.rand(2, 8).half()}, tensors)
    assert_clean(lambda: runstate.load_tensors(tensors), tensors, tensors.read_bytes())
    acts = tmp_path / "q_in.npy"
    np.save(acts, np.random.default_rng(0).standard_normal((3, 8, 16)).astype(np.float16))
    assert_clean(lambda: np.asarray(runstate.open_array(acts)).sum(), acts, acts.read_bytes())


def test_text_and_instruction_files(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tmp_path / "notes.txt"
    text.write_text("Ünïcode text, quoted \"like this\".\n" * 20, encoding="utf-8")
    assert_clean(lambda: data.load_text(str(text)), text, text.read_bytes())
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}."}) for i in range(5)))
    assert_clean(lambda: Examples.from_instructions(jsonl, tok, 64), jsonl, jsonl.read_bytes())
    assert_clean(lambda: data.load_text(str(jsonl)), jsonl, jsonl.read_bytes(), seed=1)
