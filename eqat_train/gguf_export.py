"""GGUF export: an eqat checkpoint as one file that llama.cpp, Ollama and LM Studio load.

Quantized linears become GGUF's Q4_1 with the same integer codes: a Q4_1 block of 32 weights computes
`d * q + m`, eqat computes `s * (q - z)`, so every 32-weight block of a group gets `d = s` (exact: scales
are stored in fp16) and `m = -s * z` rounded to fp16 (the only loss, below 2^-11 of `s * z`). 2- and
3-bit codes are valid 4-bit codes, so every bit-width maps exactly; the file is then as large as a
4-bit one. Group sizes must be multiples of 32 (or -1), which every eqat group size is.

Metadata and tokenizer come from the source GGUF when the checkpoint was made from one (copied field by
field, so llama.cpp sees the very vocabulary and chat template it already knows), otherwise from the
checkpoint's config and tokenizer files. Unquantized tensors are written as in the source: the source
GGUF's own bytes where they dequantize to exactly the checkpoint's values (e.g. SmolLM2's Q8_0
embeddings), F32 otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eqat_kernels import QuantLinear
from eqat_kernels.packing import unpack_qweight, unpack_qzeros

Q4_1_BLOCK = 32
# model_type -> (GGUF architecture, whether llama.cpp's converter permutes q/k rows for its rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
SKIPPED_SOURCE_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


Q4_1_MAX_BITS = 4  # a Q4_1 code is a nibble


def check_exportable_bits(bits: int) -> None:
    if bits > Q4_1_MAX_BITS:
        raise ValueError(f"GGUF export writes Q4_1 (codes of at most {Q4_1_MAX_BITS} bits); this checkpoint has "
                         f"{bits}-bit codes, which Q4_1 cannot hold")


def q4_1_blocks(layer: QuantLinear) -> np.ndarray:
    """The layer's codes, scales and zero points as Q4_1 blocks: uint8 `[N, K/32 * 20]` (GGUF row order)."""
    spec = layer.spec
    check_exportable_bits(spec.bits)
    if spec.in_features % Q4_1_BLOCK or (spec.group_size != -1 and spec.group % Q4_1_BLOCK):
        raise ValueError(f"Q4_1 needs K and the group size to be multiples of 32 (K={spec.in_features}, "
                         f"group={spec.group_size})")
    if layer.g_idx is not None and layer.input_permutation() is not None:
        raise ValueError("act-order (g_idx) layers group features out of order; GGUF blocks are contiguous")
    codes = unpack_qweight(layer.qweight, spec.bits, spec.in_features).t().to(torch.uint8)  # [N, K]
    zeros = unpack_qzeros(layer.qzeros, spec.bits, spec.out_features).float()  # [G, N]
    scales = layer.scales.detach().float()  # [G, N]
    group_of_block = torch.arange(0, spec.in_features, Q4_1_BLOCK) // spec.group
    d = scales[group_of_block].t().contiguous()  # [N, K/32]
    m = (-scales[group_of_block] * zeros[group_of_block]).t().contiguous()
    n, nb = d.shape
    q = codes.reshape(n, nb, 2, Q4_1_BLOCK // 2)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).numpy()  # element j in the low nibble, j + 16 in the high one
    dm = np.concatenate([d.half().numpy()[..., None].view(np.uint8), m.half().numpy()[..., None].view(np.uint8)], -1)
    return np.concatenate([dm.reshape(n, nb, 4), qs], axis=-1).reshape(n, nb * 20)


def llama_cpp_rotary_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf's `permute`): per head, interleave the two rotary
    halves. A permutation of output rows, so it applies to quantized blocks unchanged."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def save_gguf(model: nn.Module, tokenizer, path: str | Path, source_gguf: str | Path | None = None,
              tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` (packed QuantLinears, other tensors as they are) to `path` atomically."""
    import gguf

    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise ValueError(_unsupported(config.model_type))
    arch, permute_qk = ARCHITECTURES[config.model_type]
    source = _open_source(source_gguf, arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        if source is not None:
            _copy_metadata(writer, source)
        else:
            _write_metadata(writer, config, tokenizer, tokenizer_dir)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array, qtype in _tensors(model, arch, permute_qk, source):
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """`eqat export CHECKPOINT --format gguf --out FILE.gguf`."""
    from .checkpoint import load_quantized, read_quantization_config, source_model

    checkpoint = Path(checkpoint)
    model_type = _model_type(checkpoint)
    if model_type not in ARCHITECTURES:  # refuse before loading anything
        raise ValueError(_unsupported(model_type))
    qconfig = read_quantization_config(checkpoint)
    check_exportable_bits(qconfig["bits"])
    model, tokenizer = load_quantized(checkpoint, dtype=torch.float32)
    recorded = source_model(qconfig) or ""
    source = Path(recorded) if recorded.endswith(".gguf") and Path(recorded).is_file() else None
    return save_gguf(model, tokenizer, out, source_gguf=source, tokenizer_dir=checkpoint)


def _unsupported(model_type) -> str:
    return (f"GGUF export supports {sorted(ARCHITECTURES)} models; {model_type!r} has no mapping onto "
            "llama.cpp's tensor names here")


def _model_type(checkpoint: Path) -> str | None:
    from .checkpoint import read_quantization_config

    read_quantization_config(checkpoint)  # a clear error for anything that is not a quantized checkpoint
    return json.loads((checkpoint / "config.json").read_text()).get("model_type")


def _open_source(source_gguf, arch: str):
    if source_gguf is None:
        return None
    from .models import check_gguf

    reader = check_gguf(Path(source_gguf))
    field = reader.fields.get("general.architecture")
    if field is None or field.contents() != arch:
        return None  # another architecture: its metadata would describe a different model
    return reader


def _copy_metadata(writer, reader) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_SOURCE_KEYS):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _write_metadata(writer, config, tokenizer, tokenizer_dir) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None)) if isinstance(rope, dict) else None
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError("GGUF export without a source GGUF needs the checkpoint's tokenizer.json (a fast BPE tokenizer)")
    vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    tokens, _, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensors(model: nn.Module, arch: str, permute_qk: bool, source):
    """(GGUF name, array, GGML type) for every tensor of the model, the tied head written once."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    source_tensors = {t.name: t for t in source.tensors} if source is not None else {}
    tied = _tied_head(model)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quantized.items():
        gname = _gguf_name(names, name + ".weight")
        blocks = q4_1_blocks(m)
        if permute_qk and name.endswith(("q_proj", "k_proj")):
            blocks = llama_cpp_rotary_permute(blocks, n_head if name.endswith("q_proj") else n_kv)
        yield gname, blocks, gguf.GGMLQuantizationType.Q4_1
        if m.bias is not None:
            bias = m.bias.detach().float().numpy()
            if permute_qk and name.endswith(("q_proj", "k_proj")):
                bias = llama_cpp_rotary_permute(bias, n_head if name.endswith("q_proj") else n_kv)
            yield _gguf_name(names, name + ".bias"), bias, gguf.GGMLQuantizationType.F32
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in quantized or key in tied:
            continue
        if permute_qk and module.endswith(("q_proj", "k_proj")):
            raise ValueError(f"{module} is not quantized; export quantizes every attention projection")
        gname = _gguf_name(names, key)
        values = tensor.detach().float().numpy()
        yield gname, *_as_source(values, source_tensors.get(gname))


def _as_source(values: np.ndarray, src) -> tuple[np.ndarray, object]:
    """The source GGUF's bytes when they dequantize to exactly `values`, else F32."""
    import gguf

    if src is not None and tuple(int(d) for d in reversed(src.shape)) == values.shape:
        raw = np.asarray(src.data)
        if src.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            same = np.array_equal(raw.astype(np.float32).reshape(values.shape), values)
        else:
            same = np.array_equal(gguf.quants.dequantize(raw, src.tensor_type).reshape(values.shape), values)
        if same:
            return raw, src.tensor_type
    return np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.F32


def _gguf_name(names, key: str) -> str:
    gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise ValueError(f"no GGUF tensor name for {key!r}")
    return gname


def _tied_head(model: nn.Module) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        return {f"{name}.weight" for name, module in model.named_modules() if module is out}
    return set()
