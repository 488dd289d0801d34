"""Bad input through the public API and the CLI: each gets a specific error naming the problem, never a
traceback from inside torch and never a silently wrong result. One table, one row per kind of mistake."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eqat_kernels import QuantLinear, packing, quantizer
from eqat_kernels.spec import QuantSpec
from eqat_train import data, models
from eqat_train.baselines import RTNConfig
from eqat_train.block_ap import BlockAPConfig
from eqat_train.checkpoint import load_quantized
from eqat_train.cli import main as cli_main
from eqat_train.configs import RunConfig
from eqat_train.e2e_qp import E2EConfig, E2ETrainer
from eqat_train.examples import Examples
from helpers import run_quantize


def _linear(k=64, n=32, fill=None):
    lin = nn.Linear(k, n)
    if fill is not None:
        with torch.no_grad():
            lin.weight[0, 0] = fill
    return lin


def _packed(k=64, n=32):
    return QuantLinear.from_linear(_linear(k, n), 4, 32).pack()


def _edited_checkpoint(src, tmp_path, tensors=None, config=None):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c["quantization_config"])
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _truncate(folder):
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    return folder


def _pickle_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle")
    return folder


LAYER = "model.layers.0.self_attn.q_proj"

# (id, callable(ctx) -> None, exception type, message pattern); ctx gives tmp_path and the tiny checkpoint
CASES = [
    ("bits=0", lambda c: QuantSpec(0, 32, 64, 32), ValueError, r"unsupported bits=0"),
    ("bits=1", lambda c: QuantLinear.from_linear(_linear(), 1, 32), ValueError, r"unsupported bits=1"),
    ("bits=5", lambda c: BlockAPConfig(bits=5), ValueError, r"unsupported bits=5"),
    ("bits=9", lambda c: QuantSpec(9, 32, 64, 32), ValueError, r"unsupported bits=9"),
    ("bits='4' (string)", lambda c: QuantSpec("4", 32, 64, 32), ValueError, r"unsupported bits='4'"),
    ("group=0", lambda c: QuantSpec(4, 0, 64, 32), ValueError, r"unsupported group_size=0"),
    ("group=-2", lambda c: RTNConfig(group_size=-2), ValueError, r"unsupported group_size=-2"),
    ("group=7", lambda c: QuantLinear.from_linear(_linear(), 4, 7), ValueError, r"unsupported group_size=7"),
    ("in_features off the packing unit", lambda c: QuantLinear.from_linear(_linear(k=48), 4, 32), ValueError,
     r"in_features=48 is not a multiple of 32"),
    ("non-2D weight", lambda c: quantizer.minmax_init(torch.randn(2, 32, 32), QuantSpec(2, 32, 32, 32)), ValueError,
     r"weight must be 2-D"),
    ("not a linear layer", lambda c: QuantLinear.from_linear(nn.Conv1d(4, 4, 1), 4, 32), TypeError,
     r"expects an nn.Linear, got Conv1d"),
    ("integer activations", lambda c: _packed()(torch.ones(2, 64, dtype=torch.int64)), ValueError,
     r"floating-point input with last dim 64"),
    ("activations of the wrong width", lambda c: _packed()(torch.ones(2, 63)), ValueError, r"last dim 64, got .*63"),
    ("activations on another device", lambda c: _packed()(torch.ones(2, 64, device="meta")), ValueError,
     r"input on meta but the layer's weights are on cpu"),
    ("NaN weight", lambda c: QuantLinear.from_linear(_linear(fill=float("nan")), 4, 32), ValueError, r"NaN"),
    ("Inf weight", lambda c: QuantLinear.from_linear(_linear(fill=float("inf")), 4, 32), ValueError, r"Inf"),
    ("codes out of range", lambda c: packing.pack_qweight(torch.full((32, 4), 4, dtype=torch.int32), 2), ValueError,
     r"codes out of range for 2 bits"),
    ("empty calibration text", lambda c: data.load_text(str(_write(c, "empty.txt", ""))), ValueError, r"is empty"),
    ("text shorter than one window", lambda c: data.tokenize_windows(c["tok"], "a few words", 512), ValueError,
     r"fewer than one window of 512"),
    ("zero calibration windows", lambda c: RunConfig(calib_windows=0), ValueError, r"at least one window"),
    ("zero sampling temperature", lambda c: RunConfig(gen_temperature=0.0), ValueError, r"positive finite temperature"),
    ("zero top-k", lambda c: RunConfig(gen_top_k=0), ValueError, r"top_k >= 1"),
    ("chat share above 1", lambda c: RunConfig(gen_chat_fraction=1.5), ValueError, r"chat_fraction must be in \[0, 1\]"),
    ("window length 1", lambda c: data.tokenize_windows(c["tok"], "text", 1), ValueError, r"seq_len must be at least 2"),
    ("missing model path", lambda c: models.resolve_source(str(c["tmp"] / "nope.gguf")), FileNotFoundError,
     r"does not exist"),
    ("GGUF file that is not one", lambda c: models.resolve_source(str(_write(c, "x.gguf", "PK not gguf"))), ValueError,
     r"not a GGUF file"),
    ("checkpoint with a missing tensor",
     lambda c: load_quantized(_edited_checkpoint(c["ckpt"], c["tmp"], tensors=lambda t: t.pop(f"{LAYER}.qzeros"))),
     ValueError, rf"missing {LAYER}.qzeros"),
    ("checkpoint tensor of the wrong shape",
     lambda c: load_quantized(_edited_checkpoint(c["ckpt"], c["tmp"], tensors=lambda t: t.__setitem__(
         f"{LAYER}.qweight", torch.zeros(3, 64, dtype=torch.int32)))), ValueError, r"q_proj.qweight is torch.int32 \(3, 64\)"),
    ("NaN scales in a checkpoint",
     lambda c: load_quantized(_edited_checkpoint(c["ckpt"], c["tmp"], tensors=lambda t: t[f"{LAYER}.scales"].fill_(float("nan")))),
     ValueError, r"q_proj.scales has NaN/Inf"),
    ("truncated safetensors", lambda c: load_quantized(_truncate(_edited_checkpoint(c["ckpt"], c["tmp"]))), ValueError,
     r"truncated or corrupt"),
    ("quantization_config disagrees with the tensors",
     lambda c: load_quantized(_edited_checkpoint(c["ckpt"], c["tmp"], config=lambda q: q.update(group_size=64))),
     ValueError, r"bits=2, group_size=64"),
    ("unknown checkpoint_format",
     lambda c: load_quantized(_edited_checkpoint(c["ckpt"], c["tmp"], config=lambda q: q.update(checkpoint_format="awq"))),
     ValueError, r"checkpoint_format='awq'"),
    ("pickle checkpoint", lambda c: load_quantized(_pickle_only(_edited_checkpoint(c["ckpt"], c["tmp"]))),
     FileNotFoundError, r"pickle files are never loaded"),
    ("folder without config.json", lambda c: load_quantized(c["tmp"]), FileNotFoundError, r"no config.json"),
    ("output folder holding something else",
     lambda c: run_quantize(model=str(c["model"]), out=str(_write(c, "taken/notes.txt", "mine").parent)),
     FileExistsError, r"is not an eqat checkpoint"),
    ("E2E-QP on an unquantized model",
     lambda c: E2ETrainer(nn.Sequential(nn.Linear(32, 32)), Examples.from_windows(torch.zeros(4, 8, dtype=torch.long)),
                          E2EConfig()), ValueError, r"no QuantLinear layers"),
    ("E2E-QP negative learning rate", lambda c: E2EConfig(lr=-1.0), ValueError, r"positive number"),
    ("instruction file with a broken line",
     lambda c: Examples.from_instructions(_write(c, "bad.jsonl", '{"prompt": "x"'), c["tok"]), ValueError,
     r"bad.jsonl:1 is not valid JSON"),
]


def _write(ctx, name, text):
    path = ctx["tmp"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def ctx(tmp_path, tiny_packed_dir, tiny_model_dir):
    from transformers import AutoTokenizer

    return {"tmp": tmp_path, "ckpt": tiny_packed_dir, "model": tiny_model_dir,
            "tok": AutoTokenizer.from_pretrained(tiny_packed_dir)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(ctx, case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call(ctx)


def test_the_table_covers_at_least_twenty_kinds():
    assert len(CASES) >= 20


CLI_CASES = [
    ("missing model", ["quantize", "--model", "/nonexistent/model.gguf", "--out", "{tmp}/o"], "does not exist"),
    ("bits 5", ["quantize", "--bits", "5", "--out", "{tmp}/o"], "unsupported bits=5"),
    ("group 7", ["quantize", "--group-size", "7", "--out", "{tmp}/o"], "unsupported group_size=7"),
    ("missing checkpoint", ["eval", "{tmp}/none"], "does not exist"),
    ("missing instruction file", ["e2e", "{ckpt}", "--out", "{tmp}/e", "--instruct", "{tmp}/none.jsonl",
                                  "--seq-len", "32", "--calib-windows", "8", "--eval-windows", "4"], "does not exist"),
    ("empty prompt", ["generate", "{ckpt}", "--prompt", ""], "non-empty prompt"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_the_message(ctx, capsys, case):
    _, argv, message = case
    argv = [a.format(tmp=ctx["tmp"], ckpt=ctx["ckpt"]) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_nan_activations_in_calibration_are_named(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("nan")
    broken = tmp_path / "nan_model"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    with pytest.raises(ValueError, match="activations reaching this block contain NaN/Inf"):
        run_quantize(model=str(broken), out=str(tmp_path / "o"), bits=2, group_size=32, seq_len=32,
                                 calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[], e2e=None,
                                 text="stdlib")
    with pytest.raises(ValueError, match="fp model's next-token logits contain NaN/Inf"):  # self-generation
        run_quantize(model=str(broken), out=str(tmp_path / "o2"), bits=2, group_size=32, seq_len=32,
                                 calib_windows=4, val_windows=0, eval_windows=2, eval_texts=[], e2e=None)
