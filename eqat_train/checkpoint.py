"""Quantized checkpoints (docs/DESIGN.md, section 4): a complete Hugging Face folder with GPTQ-v2 tensors.

`save_quantized` writes config.json (with `quantization_config`), model.safetensors holding every
tensor (packed layers plus embeddings, norms, head) and the tokenizer, into a temporary folder that is
renamed into place only when complete. `load_quantized` rebuilds the model with packed QuantLinears
and refuses anything that disagrees with its config. Only safetensors is ever read: no pickle.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from eqat_kernels import QuantLinear, replace_module
from eqat_kernels.spec import QuantSpec

from .faults import crash_point
from .models import fold_head_input, linear_features

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # "gptq" = v1: zero points stored as z - 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def quantization_config(bits: int, group_size: int, extra: dict | None = None) -> dict:
    """The config GPTQ-v2 loaders (GPTQModel, vLLM) read, plus eqat's own keys under `eqat`."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": False, "desc_act": False,
            "checkpoint_format": "gptq_v2", "eqat": extra or {}}


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, qconfig: dict) -> Path:
    """Write the folder atomically: a kill at any moment leaves either the old folder or the new one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(out)
    for stale in out.parent.glob(f".{out.name}.tmp*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _write_model(model, tmp, qconfig)
        crash_point("save.model_written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check_config_written(tmp, qconfig)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            crash_point("save.old_moved_aside")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def recover_interrupted_save(out: Path) -> None:
    """A kill between moving the old folder aside and renaming the new one in leaves only `.<name>.old`:
    put it back, so the previous checkpoint is where its user expects it."""
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():
        os.replace(old, out)


def _write_model(model: nn.Module, folder: Path, qconfig: dict) -> None:
    """config.json + model.safetensors, written directly (a GGUF-loaded model refuses save_pretrained)."""
    config = model.config.to_diff_dict()  # what save_pretrained writes: the source's fields, no defaults
    config["quantization_config"] = qconfig
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    tied = _tied_names(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _check_config_written(folder: Path, qconfig: dict) -> None:
    written = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    if written.get("checkpoint_format") != qconfig["checkpoint_format"] or written.get("bits") != qconfig["bits"]:
        raise RuntimeError("transformers did not keep quantization_config in config.json")


def read_quantization_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e.msg}") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        raise ValueError(f"{config_path} has no quantization_config: not a quantized checkpoint")
    fmt = q.get("checkpoint_format", "gptq")
    if q.get("quant_method") != "gptq" or fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"unsupported checkpoint: quant_method={q.get('quant_method')!r}, "
                         f"checkpoint_format={fmt!r} (eqat reads {CHECKPOINT_FORMATS})")
    QuantSpec(q.get("bits"), q.get("group_size"), 32, 32)  # validates bits and group size with clear errors
    return q


def source_model(qconfig: dict) -> str | None:
    """The fp model a checkpoint was quantized from, as eqat recorded it (None for other tools' folders)."""
    return qconfig.get("eqat", {}).get("model") or None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = f" (found {pickles}: pickle files are never loaded, they can run code)" if pickles else ""
        raise FileNotFoundError(f"{path} has no .safetensors weights{hint}")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def default_dtype() -> torch.dtype:
    """The fast dtype for the unquantized tensors (embeddings, norms, head): fp16 where CUDA runs the
    Triton kernels, bf16 on CPU (torch's int4 kernel computes in bf16, and a bf16 head decodes ~2x
    faster than fp32 on CPU)."""
    return torch.float16 if torch.cuda.is_available() else torch.bfloat16


def load_quantized(path: str | Path, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, object]:
    """(model, tokenizer) from an eqat/GPTQ-v2 folder, with packed QuantLinear layers.

    `dtype` is that of the unquantized tensors: "auto" (default_dtype()) or a torch dtype; pass
    torch.float32 for exact evaluation or further training."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype == "auto":
        dtype = default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be 'auto' or a floating-point torch dtype, got {dtype!r}")
    path = Path(path)
    recover_interrupted_save(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    q = read_quantization_config(path)
    bits, group_size, fmt = q["bits"], q["group_size"], q.get("checkpoint_format", "gptq")
    tensors = _load_tensors(path)
    try:
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # eqat builds the quantized layers itself
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # damaged field values surface from transformers as any of these
    except (KeyError, TypeError, AttributeError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise ValueError(f"{path / 'config.json'} does not describe a model transformers can build: "
                         f"{type(e).__name__}: {e}") from None
    quantized = {name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")}
    if not quantized:
        raise ValueError(f"{path} holds no quantized layers (no *.qweight tensors)")
    for name in sorted(quantized):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in a {config.model_type} model") from None
        features = linear_features(linear)
        if features is None:
            raise ValueError(f"checkpoint quantizes {name!r}, which is a {type(linear).__name__}, not a linear layer")
        in_features, out_features, has_bias = features
        _check_layer_tensors(tensors, name, in_features, out_features, bits, group_size)
        if fmt == "gptq":
            tensors[f"{name}.qzeros"] = v1_to_v2_qzeros(tensors[f"{name}.qzeros"], bits, out_features, name)
        has_g_idx = f"{name}.g_idx" in tensors
        if has_g_idx:
            tensors[f"{name}.g_idx"] = _check_g_idx(tensors[f"{name}.g_idx"], name, in_features)
        layer = QuantLinear(in_features, out_features, bits, group_size, bias=has_bias,
                            dtype=tensors[f"{name}.scales"].dtype, g_idx=has_g_idx)
        replace_module(model, name, layer)
    expected = set(model.state_dict().keys())
    tied = _tied_names(model)
    missing = sorted(expected - set(tensors) - tied)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # tensor shapes that disagree with config.json
        raise ValueError(f"{path} does not match its config.json: {str(e)[:300]}") from None
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":  # non-persistent buffers (rotary inv_freq) are rebuilt, not stored
            raise ValueError(f"buffer {name} was not restored")
    model.tie_weights()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.input_permutation()  # act-order: validate and sort once, at load time
            except ValueError as e:
                raise ValueError(f"{name}.g_idx: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if not name.endswith("scales") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.eval()
    return fold_head_input(model), load_tokenizer(path)


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer_config.json").exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    # the Rust tokenizers library reports a damaged tokenizer.json as a bare Exception
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the tokenizer files in {path} are unreadable (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e)[:200]}") from None


def _tied_names(model: nn.Module) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is out:
                return {f"{name}.weight"}
    return set()


def _check_layer_tensors(tensors: dict, name: str, in_features: int, out_features: int, bits: int,
                         group_size: int) -> None:
    spec = QuantSpec(bits, group_size, in_features, out_features)
    for key, shape, dtypes in ((f"{name}.qweight", spec.qweight_shape, (torch.int32,)),
                               (f"{name}.qzeros", spec.qzeros_shape, (torch.int32,)),
                               (f"{name}.scales", spec.scales_shape, (torch.float16, torch.bfloat16, torch.float32))):
        if key not in tensors:
            raise ValueError(f"checkpoint is missing {key}")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"{key} is {t.dtype} {tuple(t.shape)}, but bits={bits}, group_size={group_size} "
                             f"and the layer's {in_features}->{out_features} need {shape}")
    if not torch.isfinite(tensors[f"{name}.scales"]).all():
        raise ValueError(f"{name}.scales has NaN/Inf values")


def v1_to_v2_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, name: str = "layer") -> torch.Tensor:
    """GPTQ v1 stores `z - 1` (AutoGPTQ's convention); eqat computes with `z`. Exact, or a clear refusal."""
    from eqat_kernels.packing import pack_qzeros, unpack_qzeros

    z = unpack_qzeros(qzeros, bits, out_features) + 1
    if (z > (1 << bits) - 1).any():
        raise ValueError(f"{name}.qzeros: a v1 (checkpoint_format 'gptq') zero point of {1 << bits} does not fit "
                         f"in {bits} bits; this checkpoint cannot be represented exactly")
    return pack_qzeros(z, bits)


def _check_g_idx(g_idx: torch.Tensor, name: str, in_features: int) -> torch.Tensor:
    if g_idx.shape != (in_features,) or g_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}.g_idx is {g_idx.dtype} {tuple(g_idx.shape)}; expected int32 ({in_features},)")
    return g_idx.to(torch.int32)
