"""Test set-up: Triton kernels run under the CPU interpreter (no GPU here or in CI)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# self-generated calibration sets of the tiny test models go to a throwaway cache, not ~/.cache/eqat
os.environ.setdefault("EQAT_CACHE", __import__("tempfile").mkdtemp(prefix="eqat-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402



@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails the comparison."""
    from eqat_kernels.triton_kernels import ops

    monkeypatch.setattr(ops, "_output", lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer trained on the stdlib text: a complete local
    Hugging Face folder, built offline in a few seconds."""
    from helpers import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_packed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama quantized with RTN at w2g32 (no E2E-QP): the starting point of E2E-QP tests."""
    from helpers import run_quantize

    out = tmp_path_factory.mktemp("tiny_packed") / "w2g32-rtn"
    run_quantize(model=str(tiny_model_dir), out=str(out), method="rtn", bits=2, group_size=32, seq_len=32,
                             calib_windows=8, val_windows=0, eval_windows=4, eval_texts=[], e2e=None)
    return out
