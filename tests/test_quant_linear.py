"""QuantLinear as a drop-in nn.Linear: states, storage format, dispatch, and whole-model swaps."""
import copy

import pytest
import torch
from torch import nn

from eqat_kernels import QuantLinear, pack_all, quantize_linears, quantizer, reference
from helpers import rel_err




def _packed_pair(bits, group, in_f=576, out_f=192, bias=True, seed=0):
    torch.manual_seed(seed)
    trainable = QuantLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), bits, group)
    with torch.no_grad():
        trainable.zeros.copy_(trainable.zeros.round())
        trainable.scales.copy_(trainable.scales.half().float())
    packed = copy.deepcopy(trainable).pack()
    return trainable, packed


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 128), (4, -1), (8, 128)])
def test_packed_forward_equals_fake_quant(bits, group):
    trainable, packed = _packed_pair(bits, group)
    x = torch.randn(5, 576, dtype=torch.float64)
    expected = nn.functional.linear(x, quantizer.fake_quantize(trainable.weight.double(), trainable.scales.double(),
                                                               trainable.zeros.double(), trainable.spec),
                                    trainable.bias.double())
    packed.backend = "reference"
    assert rel_err(packed(x), expected) < 1e-12
    packed.backend = "auto"
    with torch.no_grad():  # CPU inference: torch's int4 kernel in bf16
        assert rel_err(packed(x.float()), expected) < 1e-2


def test_state_dict_is_the_storage_format_and_reloads():
    _, packed = _packed_pair(3, 128)
    sd = packed.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == {
        "qweight": ((576 * 3 // 32, 192), torch.int32), "qzeros": ((5, 192 * 3 // 32), torch.int32),
        "scales": ((5, 192), torch.float16), "bias": ((192,), torch.float32)}
    empty = QuantLinear(576, 192, 3, 128, bias=True, dtype=torch.float32)
    empty.load_state_dict(sd)
    x = torch.randn(3, 576)
    with torch.no_grad():
        torch.testing.assert_close(empty(x), packed(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuantLinear(576, 192, 4, 128).load_state_dict(sd)


def _frozen_codes_twin(packed: QuantLinear):
    """E2E-QP's model of a packed layer in plain autograd: codes and zeros frozen, only s (and bias) free."""
    cmz = reference.codes_minus_zeros(packed.qweight, packed.qzeros, packed.spec).double()
    s = packed.scales.detach().double().requires_grad_()
    b = packed.bias.detach().double().requires_grad_()
    return (lambda x: nn.functional.linear(x, cmz * quantizer.expand_groups(s, packed.spec), b)), s, b


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_match_frozen_code_autograd(backend):
    """dx, ds and dbias from the packed autograd Function equal autograd on the dequantized weight."""
    _, packed = _packed_pair(2, 64, in_f=256, out_f=64)
    twin, s, b = _frozen_codes_twin(packed)
    packed.backend = backend
    packed.train_scales()
    packed.bias.requires_grad_(True)
    x = torch.randn(3, 7, 256)
    x1, x2 = x.double().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 7, 64)
    twin(x1).backward(dy.double())
    packed(x2).backward(dy)
    assert rel_err(x2.grad, x1.grad) < 1e-5
    assert rel_err(packed.scales.grad.float(), s.grad) < 2e-3  # ds is cast to the fp16 scales
    assert rel_err(packed.bias.grad, b.grad) < 1e-6


def test_dispatch_uses_int4_kernel_for_cpu_inference_and_reference_for_training(monkeypatch):
    from eqat_kernels import cpu

    _, packed = _packed_pair(4, 128)
    calls = []
    real = cpu.int4_matmul
    monkeypatch.setattr(cpu, "int4_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        packed(torch.randn(1, 576))
    assert calls == [1]
    packed.train_scales()
    packed(torch.randn(1, 576)).sum().backward()
    assert calls == [1] and packed.scales.grad is not None


def test_cpu_cache_follows_scale_updates():
    _, packed = _packed_pair(4, 128)
    x = torch.randn(2, 576)
    with torch.no_grad():
        y0 = packed(x)
        packed.scales.mul_(2)
        y1 = packed(x)
    assert rel_err(y1, 2 * (y0 - packed.bias) + packed.bias) < 1e-2


def test_cpu_training_step_builds_w_hat_once(monkeypatch):
    """A training forward keeps its W_hat for dx (grad mode is off inside the autograd Function, so the
    decision must come from needs_input_grad)."""
    _, packed = _packed_pair(2, 64)
    packed.backend = "reference"
    packed.train_scales()
    calls = []
    real = reference.scale_codes
    monkeypatch.setattr(reference, "scale_codes", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 5, 576, requires_grad=True)
    packed(x).pow(2).sum().backward()
    assert len(calls) == 1 and x.grad is not None and packed.scales.grad is not None
    with torch.no_grad():
        packed(x)
    assert len(calls) == 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sequential_drop_in_outputs_and_gradients(backend):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64))
    quantize_linears(model, bits=3, group_size=64)
    fake = copy.deepcopy(model)
    assert pack_all(model) == 2
    twins = []
    for i in (0, 2):
        twin, s, _ = _frozen_codes_twin(model[i])
        twins.append((twin, s))
        model[i].train_scales()
        model[i].backend = backend
    x = torch.randn(4, 256)
    y = model(x)
    y_twin = twins[1][0](nn.functional.gelu(twins[0][0](x.double())))
    assert rel_err(y, y_twin) < 1e-5
    with torch.no_grad():  # and the packed model is the fake-quant model it came from
        assert rel_err(y, fake(x)) < 1e-2
    y.square().sum().backward()
    y_twin.square().sum().backward()
    for i, (_, s) in zip((0, 2), twins):
        assert rel_err(model[i].scales.grad.float(), s.grad) < 2e-3


def test_tiny_llama_swap_matches_fake_quant_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    swapped = quantize_linears(model, 4, 32, include=lambda name, m: name != "lm_head")
    assert len(swapped) == 2 * 7
    for m in swapped.values():
        with torch.no_grad():
            m.zeros.copy_(m.zeros.round())
            m.scales.copy_(m.scales.half().float())
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        fake = model(ids).logits
    pack_all(model)
    for m in swapped.values():
        m.backend = "reference"
    with torch.no_grad():
        assert rel_err(model(ids).logits, fake) < 1e-5
    for m in swapped.values():
        m.backend = "triton"
    with torch.no_grad():
        assert rel_err(model(ids).logits, fake) < 1e-5


@pytest.mark.parametrize("bits,group,message", [(5, 128, "unsupported bits"), (4, 7, "unsupported group_size"),
                                                (4, 0, "unsupported group_size")])
def test_from_linear_bad_arguments(bits, group, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear.from_linear(nn.Linear(256, 64), bits, group)


def test_from_linear_refuses_nan_weights_and_bad_shapes():
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        QuantLinear.from_linear(lin, 4, 128)
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of 32"):
        QuantLinear.from_linear(nn.Linear(100, 64), 4, 32)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1), 4, 32)


def test_forward_refuses_wrong_input():
    _, packed = _packed_pair(4, 128)
    with pytest.raises(ValueError, match="last dim 576"):
        packed(torch.randn(2, 512))
    with pytest.raises(ValueError, match="floating-point"):
        packed(torch.ones(2, 576, dtype=torch.long))
