"""Fidelity of a quantized model to its fp model: is it still the same model?

Per text: perplexity of both, their ratio, mean per-token KL(fp || quantized) over the full vocabulary,
and top-1 next-token agreement. Over fixed prompts: greedy agreement (leading generated tokens equal
to the fp model's) and chat answers (does the model answer everyday questions the fp model answers).
Perplexity on a calibration genre can be bought by fitting that text; these numbers cannot.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from eqat_kernels import compute_path

CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Explain what a prime number is.",
    "Suggest a name for a small bakery.",
    "How many days are there in a leap year?",
)
GREEDY_TOKENS = 32


@dataclass
class TextFidelity:
    ppl: float
    ppl_fp: float
    ppl_ratio: float
    kl: float  # mean per-token KL(fp || quantized), nats
    top1: float  # fraction of positions where both models' most likely next token agree

    def as_dict(self) -> dict:
        return {k: round(v, 5) for k, v in asdict(self).items()}


KL_CHUNK_ROWS = 64  # positions per pass: a 49k vocabulary's fp32 intermediates stay ~13 MB each


class _TokenKL(torch.autograd.Function):
    """KL(fp || q) per position, computed `KL_CHUNK_ROWS` positions at a time in fp32, with the closed-form
    gradient d/dq_logits = softmax(q) - softmax(fp) (no vocabulary-sized tensors kept for backward beyond
    the two inputs). The plain expression kept ~6 full [positions, vocabulary] fp32 tensors alive: ~1 s and
    ~0.6 GB per 512-token window of a 49k vocabulary on CPU, a third of an E2E-QP step."""

    @staticmethod
    def forward(ctx, fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        fp2, q2 = fp_logits.reshape(-1, fp_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
        out = torch.empty(fp2.shape[0], dtype=torch.float32, device=fp2.device)
        for i in range(0, fp2.shape[0], KL_CHUNK_ROWS):
            out[i:i + KL_CHUNK_ROWS] = kl_from_log_probs(fp2[i:i + KL_CHUNK_ROWS].float().log_softmax(-1),
                                                         q2[i:i + KL_CHUNK_ROWS])
        ctx.save_for_backward(fp_logits, q_logits)
        return out.reshape(fp_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fp_logits, q_logits = ctx.saved_tensors
        fp2, q2 = fp_logits.reshape(-1, fp_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
        g = grad.reshape(-1, 1).float()
        dq = torch.empty_like(q2)
        for i in range(0, q2.shape[0], KL_CHUNK_ROWS):
            rows = slice(i, i + KL_CHUNK_ROWS)
            dq[rows] = g[rows] * (q2[rows].float().softmax(-1) - fp2[rows].float().softmax(-1))
        return None, dq.reshape(q_logits.shape)


def token_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(fp || q) per position, over the last (vocabulary) dimension, in fp32; differentiable in
    `q_logits` (the fp side is the teacher: no gradient)."""
    if fp_logits.shape != q_logits.shape:
        raise ValueError(f"fp logits {tuple(fp_logits.shape)} and quantized logits {tuple(q_logits.shape)} differ")
    return _TokenKL.apply(fp_logits.detach(), q_logits)


def kl_from_log_probs(fp_logp: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """`token_kl` with the fp side's log-probabilities already computed (shared by several models)."""
    return (fp_logp.exp() * (fp_logp - q_logits.float().log_softmax(-1))).sum(-1)


@torch.no_grad()
def compare_many(models: list[nn.Module], fp_model: nn.Module, windows: torch.Tensor, progress: bool = True
                 ) -> list[TextFidelity]:
    """Each model against the fp model on the same token windows, the fp forward computed once per window
    for all of them; quantized layers computed exactly (fp32 from the codes). One window at a time: two
    models' full-vocabulary logits and the KL's intermediates are ~0.5 GB per 512-token window for a 49k
    vocabulary."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    nll = [0.0] * len(models)
    kl = [0.0] * len(models)
    agree = [0.0] * len(models)
    nll_fp = 0.0
    count = 0
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(compute_path(model, "reference"))
        for start in tqdm(range(windows.shape[0]), desc="fidelity", disable=not progress, leave=False):
            ids = windows[start:start + 1]
            target = ids[:, 1:].reshape(-1)
            fp = fp_model(ids, use_cache=False).logits[:, :-1].float()
            nll_fp += nn.functional.cross_entropy(fp.reshape(-1, fp.shape[-1]), target, reduction="sum").item()
            fp_top = fp.argmax(-1)
            fp_logp = fp.log_softmax(-1)
            del fp
            for i, model in enumerate(models):
                q = model(ids, use_cache=False).logits[:, :-1].float()
                nll[i] += nn.functional.cross_entropy(q.reshape(-1, q.shape[-1]), target, reduction="sum").item()
                agree[i] += (q.argmax(-1) == fp_top).sum().item()
                kl[i] += kl_from_log_probs(fp_logp, q).sum().item()
            count += target.numel()
    ppl_fp = math.exp(nll_fp / count)
    return [TextFidelity(math.exp(n / count), ppl_fp, math.exp(n / count) / ppl_fp, k / count, a / count)
            for n, k, a in zip(nll, kl, agree)]


def compare_on_windows(model: nn.Module, fp_model: nn.Module, windows: torch.Tensor, progress: bool = True
                       ) -> TextFidelity:
    return compare_many([model], fp_model, windows, progress)[0]


@torch.no_grad()
def greedy_batch(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int, exact_length: bool = True
                 ) -> list[list[int]]:
    """Greedy continuations of all prompts as one left-padded batch (one decode step per token for all
    of them). `exact_length` suppresses end-of-sequence so every row has `new_tokens` tokens."""
    rows = [p.reshape(-1) for p in prompts]
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    device = next(model.parameters()).device
    extra = {"min_new_tokens": new_tokens} if exact_length else {}
    gen = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **extra)
    return gen[:, width:].tolist()


def greedy_tokens(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    return greedy_batch(model, prompts, new_tokens)


def leading_agreement(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def greedy_agreement(model: nn.Module, fp_tokens: list[list[int]], prompts: list[torch.Tensor]) -> float:
    """Mean number of leading greedy tokens equal to the fp model's (`fp_tokens`, from greedy_tokens)."""
    with compute_path(model, "reference"):
        ours = greedy_tokens(model, prompts, len(fp_tokens[0]))
    return sum(leading_agreement(a, b) for a, b in zip(ours, fp_tokens)) / len(prompts)


def chat_answers(model: nn.Module, tokenizer, questions=CHAT_QUESTIONS, max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to everyday questions through the chat template, all questions as one batch; each
    reply ends at the model's first end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = [prompt_ids_for(tokenizer, q) for q in questions]
    with compute_path(model, "reference"):
        rows = greedy_batch(model, prompts, max_new_tokens, exact_length=False)
    replies = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        replies.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return replies


def answered(reply: str) -> bool:
    return len(reply.strip()) > 0


def report(model: nn.Module, fp_model: nn.Module, tokenizer, texts: list[str], seq_len: int, n_windows: int,
           calibration: str | None = None, progress: bool = True) -> dict:
    """The fidelity table of `eqat eval` and of the end of `eqat quantize`: per text, then over prompts."""
    return report_many([model], fp_model, tokenizer, texts, seq_len, n_windows, [calibration], progress)[0]


def report_many(models: list[nn.Module], fp_model: nn.Module, tokenizer, texts: list[str], seq_len: int,
                n_windows: int, calibrations: list[str | None] | None = None, progress: bool = True) -> list[dict]:
    """`report` for several quantized models of one fp model, which runs once for all of them.
    `calibrations[i]`: what model i was calibrated on (texts it overlaps are marked, not hidden)."""
    from . import data

    calibrations = calibrations or [None] * len(models)
    reports = [{"texts": {}} for _ in models]
    for text, windows in data.evaluation_windows(tokenizer, texts, seq_len, n_windows).items():
        for rep, row, calibration in zip(reports, compare_many(models, fp_model, windows, progress), calibrations):
            rep["texts"][text] = row.as_dict()
            if calibration is not None and text in data.overlapping_texts(calibration, [text]):
                rep["texts"][text]["calibrated_on"] = True  # a fit to this text, not a measure of fidelity
    prompts = [prompt_ids_for(tokenizer, q) for q in CHAT_QUESTIONS]
    fp_tokens = greedy_tokens(fp_model, prompts)
    fp_replies = chat_answers(fp_model, tokenizer)
    asked = [i for i, r in enumerate(fp_replies) if answered(r)]
    for rep, model in zip(reports, models):
        replies = chat_answers(model, tokenizer)
        rep.update({"greedy_agreement": round(greedy_agreement(model, fp_tokens, prompts), 3),
                    "greedy_tokens": len(fp_tokens[0]),
                    "chat_answered": sum(answered(replies[i]) for i in asked), "chat_asked": len(asked),
                    "chat": [{"question": q, "fp": a, "quantized": b}
                             for q, a, b in zip(CHAT_QUESTIONS, fp_replies, replies)]})
    return reports


def prompt_ids_for(tokenizer, question: str) -> torch.Tensor:
    from .generation import prompt_ids

    return prompt_ids(tokenizer, messages=[{"role": "user", "content": question}])


def format_table(rep: dict) -> str:
    lines = ["| text | ppl | fp ppl | ratio | KL(fp||q) | top-1 agree |", "|---|---|---|---|---|---|"]
    for text, r in rep["texts"].items():
        mark = " (calibrated on)" if r.get("calibrated_on") else ""
        lines.append(f"| {text}{mark} | {r['ppl']:.3f} | {r['ppl_fp']:.3f} | {r['ppl_ratio']:.3f} | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} |")
    lines.append(f"greedy agreement: {rep['greedy_agreement']} of {rep['greedy_tokens']} tokens; chat: "
                 f"{rep['chat_answered']} of the {rep['chat_asked']} questions the fp model answers")
    return "\n".join(lines)
