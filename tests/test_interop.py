"""Foreign GPTQ checkpoints (v1 and v2, sym and asym, with and without act-order g_idx) load into eqat's
QuantLinear and compute what their integer codes say; eqat's own folders carry the GPTQ-v2 config."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eqat_kernels import QuantLinear
from eqat_train.checkpoint import load_quantized
from gptq_writer import write_gptq_folder

VARIANTS = [  # (bits, group, format, sym, act_order, with_g_idx)
    (4, 32, "gptq", True, False, True),
    (4, 64, "gptq", False, True, True),
    (2, 32, "gptq_v2", False, True, True),
    (3, 32, "gptq_v2", False, False, False),
    (3, 64, "gptq", False, True, True),
    (8, 32, "gptq_v2", True, False, True),
    (8, 64, "gptq", False, False, True),  # asymmetric: q - z spans -255..255, past int8
]


@pytest.fixture(scope="module")
def fp_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("bits,group,fmt,sym,act_order,with_g_idx", VARIANTS)
def test_foreign_gptq_folder_loads_and_matches_its_codes(fp_model, tmp_path, bits, group, fmt, sym, act_order, with_g_idx):
    model, tok = fp_model
    folder = tmp_path / "gptq"
    dense = write_gptq_folder(model, tok, folder, bits, group, fmt=fmt, sym=sym, act_order=act_order,
                              with_g_idx=with_g_idx)
    qmodel, qtok = load_quantized(folder, dtype=torch.float32)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    assert layers.keys() == dense.keys()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dequantize(torch.float64), dense[name], rtol=0, atol=1e-12)
        assert (layer.input_permutation() is not None) == (act_order and layer.in_features > group)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in dense.items():
            ref.get_submodule(name).weight.copy_(w.float())
    ids = qtok("The for statement is used to iterate", return_tensors="pt").input_ids
    for m in layers.values():
        m.backend = "reference"
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    for m in layers.values():  # "auto": torch's int4 kernel (bf16) for 2/3/4 bits, the reference for 8
        m.backend = "auto"
    with torch.no_grad():
        fast = qmodel(ids).logits
    assert torch.nn.functional.cosine_similarity(fast.flatten(), ref(ids).logits.flatten(), dim=0) > 0.999


def test_v1_zero_point_that_does_not_fit_is_refused(fp_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = fp_model
    folder = tmp_path / "v1"
    write_gptq_folder(model, tok, folder, 4, 32, fmt="gptq")
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("qzeros"))
    tensors[key] = torch.full_like(tensors[key], -1)  # every stored z - 1 = 15, i.e. z = 16
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        load_quantized(folder)


def test_g_idx_with_unequal_groups_is_refused(fp_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = fp_model
    folder = tmp_path / "bad_gidx"
    write_gptq_folder(model, tok, folder, 4, 32, act_order=True)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("g_idx"))
    tensors[key] = torch.zeros_like(tensors[key])  # every feature in group 0
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="each group needs exactly 32"):
        load_quantized(folder)


def test_eqat_checkpoint_declares_gptq_v2_for_other_loaders(tiny_packed_dir):
    q = json.loads((tiny_packed_dir / "config.json").read_text())["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 2, "group_size": 32, "sym": False, "desc_act": False,
        "checkpoint_format": "gptq_v2"}


def _autogptq_quant_linear_class():
    """AutoGPTQ's own packer and CPU forward (auto-gptq 0.7.1, `qlinear_cuda_old`), loaded from its file:
    the package's __init__ needs a transformers older than ours, the module itself does not."""
    import importlib.util

    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        pytest.skip("auto-gptq is not installed (.ci/run installs it with --no-deps)")
    path = spec.submodule_search_locations[0] + "/nn_modules/qlinear/qlinear_cuda_old.py"
    module_spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda_old", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_folder_packed_by_autogptq_loads_and_matches_autogptq_forward(fp_model, tmp_path, bits):
    from safetensors.torch import save_file

    AutoGPTQLinear = _autogptq_quant_linear_class()
    model, tok = fp_model
    group, gen = 32, torch.Generator().manual_seed(bits)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)
    theirs = copy.deepcopy(model)
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = mod.out_features, mod.in_features
        qmax = 2**bits - 1
        q = torch.randint(0, qmax + 1, (n, k), generator=gen)
        z = torch.randint(1, qmax + 1, (n, k // group), generator=gen)  # v1 stores z - 1: keep z >= 1
        s = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.005).half().float()
        w = (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = w
        ag = AutoGPTQLinear(bits, group, k, n, bias=False)
        ag.pack(lin, s, z.float(), None)  # AutoGPTQ's packer: v1 (z - 1) zeros, its own bit layout
        state.pop(f"{name}.weight")
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            state[f"{name}.{t}"] = getattr(ag, t).contiguous()
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, ag.float())
    folder = tmp_path / "autogptq"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": False,
                                     "desc_act": False}  # no checkpoint_format: AutoGPTQ's v1
    (folder / "config.json").write_text(json.dumps(config, default=str))
    tok.save_pretrained(folder)

    ours, _ = load_quantized(folder, dtype=torch.float32)
    for m in ours.modules():
        if isinstance(m, QuantLinear):
            m.backend = "reference"
    ids = tok("The for statement is used to iterate", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-3, atol=1e-3)
