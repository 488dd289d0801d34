"""Self-generated calibration data (data-free, as in LLM-QAT, arXiv 2305.17888): the fp model writes the
text it is calibrated on, so quantization preserves the model's own distribution rather than fitting
one narrow genre.

Plain samples start from a random vocabulary token, take the first `greedy_prefix` tokens greedily
(so they start coherently), then sample with top-k and a temperature above 1 to `seq_len` tokens (typical
text of the model is easier than the text it meets; a hotter sample calibrates more of it). Chat models
also get conversations: the model writes a user turn after the template's user header, then answers
it through the template, so chat behaviour (including ending a turn) is calibrated too. Sampling runs
in bf16 with the KV cache, batch by batch; every finished batch is saved (atomically) in a cache
folder keyed by the model's fingerprint and the settings, so a killed run resumes and later runs reuse
the whole set.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from eqat_kernels import paths
from eqat_kernels.paths import CACHE_ENV

from . import runstate
from .examples import render_chat

# A preallocated KV cache: the default one concatenates every layer's keys and values at every step,
# which made sampling 512 tokens at batch 32 ~20% slower on CPU.
STATIC = "static"


@dataclass(frozen=True)
class SelfGenConfig:
    sequences: int  # calibration + validation windows (RunConfig's counts)
    seq_len: int
    chat_fraction: float = 0.5  # share of windows cut from conversations (chat models only)
    greedy_prefix: int = 3
    # above 1 the model writes less typical text, more like the text it will meet: at w2g64 the validation
    # text's KL 1.76 (two samples at top-k 50, T 1.0) -> 1.65 (three samples), inside the sample spread;
    # T 1.4 was worse again (docs/RESULTS.md)
    top_k: int = 200
    temperature: float = 1.2
    user_tokens: int = 48  # longest user turn the model writes
    answer_tokens: int = 256  # longest answer: a batch of conversations runs until its longest answer ends
    batch_size: int = 64  # rows sampled together: 222 tokens/s in bf16 on 2 cores vs 172 at 32
    seed: int = 0

    def __post_init__(self):
        if self.sequences < 1 or self.seq_len < 8 or self.batch_size < 1:
            raise ValueError("self-generation needs sequences >= 1, seq_len >= 8 and batch_size >= 1")
        if not 0 <= self.chat_fraction <= 1:
            raise ValueError(f"chat_fraction must be in [0, 1], got {self.chat_fraction}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)) or self.top_k < 1:
            raise ValueError(f"self-generation needs a positive finite temperature and top_k >= 1, got "
                             f"temperature {self.temperature}, top_k {self.top_k}")


def cache_root() -> Path:
    return paths.cache_root() / "selfgen"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and every parameter's bytes: another model (or other weights) gets another cache."""
    h = hashlib.sha256(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class GumbelTopK(LogitsProcessor):
    """Top-k sampling at a temperature, as the Gumbel-max trick: noise is added to the k best scaled logits
    only and every other token is set to -inf, so `generate`'s greedy step draws exactly the top-k softmax
    sample. `generate(do_sample=True)` draws it with `torch.multinomial`, which makes an exponential random
    number for every vocabulary entry: 63 ms of a 243 ms step at batch 64 x 49k tokens on 2 cores."""

    def __init__(self, cfg: SelfGenConfig, generator: torch.Generator):
        self.k, self.temperature, self.generator = cfg.top_k, cfg.temperature, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, index = scores.float().topk(min(self.k, scores.shape[-1]), dim=-1)
        uniform = torch.rand(values.shape, generator=self.generator).clamp_(min=torch.finfo(torch.float32).tiny)
        pick = (values / self.temperature - (-uniform.log()).log()).argmax(-1, keepdim=True)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(-1, index.gather(-1, pick), 0.0)


def _sample(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, cfg: SelfGenConfig,
            generator: torch.Generator, pad: int, exact: bool = False) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens if exact else None, do_sample=False, pad_token_id=pad,
                          logits_processor=LogitsProcessorList([GumbelTopK(cfg, generator)]),
                          cache_implementation=STATIC)


def plain_batch(model, tokenizer, cfg: SelfGenConfig, rows: int, generator: torch.Generator) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    start = vocab[torch.randint(len(vocab), (rows, 1), generator=generator)]
    ids = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=cfg.greedy_prefix,
                         min_new_tokens=cfg.greedy_prefix, do_sample=False, pad_token_id=0, cache_implementation=STATIC)
    rest = cfg.seq_len - ids.shape[1]
    out = _sample(model, ids, torch.ones_like(ids), rest, cfg, generator, pad=0, exact=True)
    return out[:, :cfg.seq_len]


def user_header(tokenizer) -> list[int]:
    """Template tokens up to where a user's words begin (system prompt included, as the template has it)."""
    marker = "\u2063EQAT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tokenizer(text[:text.index(marker)], add_special_tokens=False).input_ids


def _conversations(model, tokenizer, cfg: SelfGenConfig, rows: int, generator: torch.Generator) -> list[int]:
    """`rows` conversations (user turn and answer both by the model), as one token stream."""
    header = torch.tensor([user_header(tokenizer)] * rows)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    asked = _sample(model, header, torch.ones_like(header), cfg.user_tokens, cfg, generator, pad)
    questions = [tokenizer.decode(_until(row[header.shape[1]:].tolist(), eos), skip_special_tokens=True).strip()
                 for row in asked]
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q or "Hello!"}]) for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    answers = _sample(model, ids, mask, cfg.answer_tokens, cfg, generator, pad)
    stream: list[int] = []
    for p, row in zip(prompts, answers):
        stream += p + _until(row[width:].tolist(), eos, keep_end=True) + tokenizer("\n", add_special_tokens=False).input_ids
    return stream


CHAT_ROWS_MARGIN = 1.5  # later chat batches sample this many times the conversations the missing tokens need
CHAT_ROWS_MIN = 4


def chat_rows(cfg: SelfGenConfig, have: int, need: int, made: int) -> int:
    """Conversations in the next chat batch: a whole batch first, then only as many as the missing tokens
    call for at the mean length so far, with a margin. A batch runs until its longest answer ends whatever
    its size, so a full batch for the last window (33.3 of 34 after the first in the default run) doubled
    the chat sampling time. Depends only on earlier batches, so a resumed run draws the same batches."""
    if made == 0:
        return cfg.batch_size
    wanted = math.ceil((need - have) / (have / made) * CHAT_ROWS_MARGIN)
    return max(1, min(cfg.batch_size, max(CHAT_ROWS_MIN, wanted)))


def _until(tokens: list[int], eos: int, keep_end: bool = False) -> list[int]:
    return tokens[:tokens.index(eos) + int(keep_end)] if eos in tokens else tokens


def window_counts(cfg: SelfGenConfig, chat: bool) -> tuple[int, int]:
    """(plain, chat) windows: `chat_fraction` of them from conversations (none without a chat template), except
    that a trailing plain batch of at most 1/8 of `batch_size` rows goes to the conversations instead (a
    batch of a few rows samples slowly)."""
    n_chat = round(cfg.sequences * cfg.chat_fraction) if chat else 0
    trailing = (cfg.sequences - n_chat) % cfg.batch_size
    if n_chat and cfg.sequences - n_chat > cfg.batch_size and trailing <= cfg.batch_size // 8:
        n_chat += trailing
    return cfg.sequences - n_chat, n_chat


@torch.no_grad()
def generate_calibration(model: nn.Module, tokenizer, cfg: SelfGenConfig,
                         cache_dir: Path | None = None, progress: bool = True) -> torch.Tensor:
    """`[cfg.sequences, cfg.seq_len]` token windows written by `model`, cached and resumable."""
    fp = model_fingerprint(model)
    folder = (cache_dir or cache_root()) / runstate.fingerprint({"model": fp, "layout": LAYOUT, **asdict(cfg)})
    final = folder / "windows.safetensors"
    if (folder / "meta.json").exists() and json.loads((folder / "meta.json").read_text()).get("model") != fp:
        raise ValueError(f"{folder} holds calibration data of another model; delete it or set {CACHE_ENV}")
    if final.exists():
        windows = runstate.load_tensors(final)["windows"]
        if tuple(windows.shape) != (cfg.sequences, cfg.seq_len):
            raise ValueError(f"{final} holds {tuple(windows.shape)} windows, expected {(cfg.sequences, cfg.seq_len)}")
        return windows
    folder.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(folder / "meta.json", json.dumps({"model": fp, "settings": asdict(cfg)}, indent=1))
    n_plain, n_chat = window_counts(cfg, bool(getattr(tokenizer, "chat_template", None)))
    _check_finite(model, tokenizer)
    sampler = _Sampler(model)
    bar = tqdm(total=cfg.sequences, desc="self-generating calibration data", disable=not progress)
    try:
        plain = []
        for i in range(0, n_plain, cfg.batch_size):
            rows = min(cfg.batch_size, n_plain - i)
            plain.append(_cached(folder / f"plain_{i // cfg.batch_size:04d}.safetensors", cfg, i,
                                 lambda g: plain_batch(sampler.lm, tokenizer, cfg, rows, g)))
            bar.update(rows)
        stream: list[torch.Tensor] = []
        have, need, made = 0, n_chat * cfg.seq_len, 0
        while have < need:
            j, rows = len(stream), chat_rows(cfg, have, need, made)
            stream.append(_cached(folder / f"chat_{j:04d}.safetensors", cfg, 1_000 + j,
                                  lambda g: torch.tensor(_conversations(sampler.lm, tokenizer, cfg, rows, g))))
            bar.update(min(need, have + stream[-1].numel()) // cfg.seq_len - have // cfg.seq_len)
            have, made = have + stream[-1].numel(), made + rows
    finally:
        bar.close()
        sampler = None  # frees the bf16 copy and the sampling caches...
        runstate.release_memory()  # ...back to the OS, so later stages do not stack on top of them
    parts = plain + ([torch.cat(stream)[:need].reshape(n_chat, cfg.seq_len)] if n_chat else [])
    order = torch.randperm(cfg.sequences, generator=torch.Generator().manual_seed(cfg.seed))
    windows = torch.cat(parts)[order].contiguous()  # plain and chat mixed in calibration and validation alike
    runstate.atomic_save_tensors({"windows": windows}, final)
    for part in list(folder.glob("plain_*.safetensors")) + list(folder.glob("chat_*.safetensors")):
        part.unlink()
    return windows


LAYOUT = 5  # bump when the sampling procedure changes, so old caches are not mistaken for new ones


def _check_finite(model: nn.Module, tokenizer) -> None:
    ids = torch.tensor([tokenizer("Hello", add_special_tokens=False).input_ids or [0]])
    if not torch.isfinite(model(ids, use_cache=False).logits).all():
        raise ValueError("the fp model's next-token logits contain NaN/Inf: it cannot write calibration data "
                         "(does it overflow in this dtype?); calibrate on a text instead (--text stdlib)")


class _Sampler:
    """A bf16 copy of the fp model, made only if something has to be generated (sampling in bf16 runs
    ~2x fp32 on CPU; the windows are token ids, so the copy's precision does not reach them)."""

    def __init__(self, model: nn.Module):
        self.model, self._lm = model, None

    @property
    def lm(self) -> nn.Module:
        if self._lm is None:
            # tensors converted straight to bf16: deepcopy then .to() would hold a whole fp32 copy first
            memo = {id(t): (nn.Parameter(t.detach().to(torch.bfloat16), requires_grad=False)
                            if isinstance(t, nn.Parameter) else t.to(torch.bfloat16))
                    for t in [*self.model.parameters(), *self.model.buffers()] if t.is_floating_point()}
            self._lm = copy.deepcopy(self.model, memo).to(torch.bfloat16)
        return self._lm


def _cached(path: Path, cfg: SelfGenConfig, index: int, make) -> torch.Tensor:
    """One batch: read back if a previous (possibly killed) run saved it, else sample it with its own
    seed, so a resumed run produces exactly what an uninterrupted one would."""
    if path.exists():
        return runstate.load_tensors(path)["tokens"]
    tokens = make(torch.Generator().manual_seed(cfg.seed * 100_003 + index))
    runstate.atomic_save_tensors({"tokens": tokens.contiguous()}, path)
    return tokens
