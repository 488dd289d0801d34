"""Shared test helpers: random packed layers and error measures."""
import torch

from eqat_kernels import packing
from eqat_kernels.spec import QuantSpec


def random_packed(spec: QuantSpec, generator: torch.Generator | None = None):
    """Fresh random codes, zeros and fp16 scales in the storage format: (qweight, qzeros, scales)."""
    g = generator or torch.Generator().manual_seed(torch.seed() % 2**31)
    codes = torch.randint(0, spec.qmax + 1, (spec.in_features, spec.out_features), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, spec.qmax + 1, spec.scales_shape, generator=g, dtype=torch.int32)
    scales = (torch.rand(spec.scales_shape, generator=g) * 0.02 + 0.005).half()
    return packing.pack_qweight(codes, spec.bits), packing.pack_qzeros(zeros, spec.bits), scales


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values in the result (unwritten or overflowed)"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=256)),
}


def tiny_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eqat_train.data import stdlib_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text()[:100_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def build_tiny_model_dir(path, family: str = "llama", seed: int = 0):
    import transformers

    tokenizer = tiny_tokenizer()
    config_cls, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, config_cls)(vocab_size=len(tokenizer), **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_quantize(method: str = "block_ap", e2e="default", progress: bool = False, **settings):
    """`pipeline.quantize` with keyword settings sorted into RunConfig, the method's config and E2EConfig
    (`e2e=None` skips E2E-QP; a dict gives E2EConfig fields)."""
    from dataclasses import fields

    from eqat_train.configs import RunConfig
    from eqat_train.e2e_qp import E2EConfig
    from eqat_train.pipeline import METHODS, quantize

    stage_cls = METHODS[method]
    run_keys = {f.name for f in fields(RunConfig)}
    stage_keys = {f.name for f in fields(stage_cls)}
    other_methods = {f.name for cls in METHODS.values() for f in fields(cls)}  # shared settings dicts
    unknown = set(settings) - run_keys - other_methods
    assert not unknown, f"not a RunConfig or {stage_cls.__name__} field: {unknown}"
    run = RunConfig(**{k: v for k, v in settings.items() if k in run_keys})
    stage = stage_cls(**{k: v for k, v in settings.items() if k in stage_keys})
    cfg = None if e2e is None else E2EConfig(**({} if e2e == "default" else e2e))
    return quantize(run, stage, cfg, progress=progress)
