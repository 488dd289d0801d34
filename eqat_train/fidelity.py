"""Fidelity of a quantized model to its fp model: is it still the same model?

Per text: perplexity of both, their ratio, mean per-token KL(fp || quantized) over the full vocabulary,
and top-1 next-token agreement. Over fixed prompts: greedy agreement (leading generated tokens equal
to the fp model's) and chat answers (does the model answer everyday questions the fp model answers).
Perplexity on a calibration genre can be bought by fitting that text; these numbers cannot.
"""
from __future__ import annotations

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


def token_kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(fp || q) per position, over the last (vocabulary) dimension, in fp32."""
    fp_logp = fp_logits.float().log_softmax(-1)
    return (fp_logp.exp() * (fp_logp - q_logits.float().log_softmax(-1))).sum(-1)


@torch.no_grad()
def compare_on_windows(model: nn.Module, fp_model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                       progress: bool = True) -> TextFidelity:
    """Both models on the same token windows; quantized layers computed exactly (fp32 from the codes).
    One window at a time by default: two models' full-vocabulary logits and the KL's intermediates are
    ~0.5 GB per 512-token window for a 49k vocabulary."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    nll = nll_fp = kl = agree = 0.0
    count = 0
    with compute_path(model, "reference"):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="fidelity", disable=not progress, leave=False):
            ids = windows[start:start + batch_size]
            q = model(ids, use_cache=False).logits[:, :-1].float()
            fp = fp_model(ids, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].reshape(-1)
            nll += nn.functional.cross_entropy(q.reshape(-1, q.shape[-1]), target, reduction="sum").item()
            nll_fp += nn.functional.cross_entropy(fp.reshape(-1, fp.shape[-1]), target, reduction="sum").item()
            kl += token_kl(fp, q).sum().item()
            agree += (q.argmax(-1) == fp.argmax(-1)).sum().item()
            count += target.numel()
    ppl, ppl_fp = math.exp(nll / count), math.exp(nll_fp / count)
    return TextFidelity(ppl, ppl_fp, ppl / ppl_fp, kl / count, agree / count)


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    out = []
    for ids in prompts:
        ids = ids.reshape(1, -1)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


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
    """Greedy replies to everyday questions through the chat template."""
    from .generation import generate

    with compute_path(model, "reference"):
        return [generate(model, tokenizer, messages=[{"role": "user", "content": q}], max_new_tokens=max_new_tokens)
                for q in questions]


def answered(reply: str) -> bool:
    return len(reply.strip()) > 0


def report(model: nn.Module, fp_model: nn.Module, tokenizer, texts: list[str], seq_len: int, n_windows: int,
           calibration: str | None = None, progress: bool = True) -> dict:
    """The fidelity table of `eqat eval` and of the end of `eqat quantize`: per text, then over prompts."""
    from . import data

    calibrated = set(data.overlapping_texts(calibration, texts)) if calibration is not None else set()
    per_text = {}
    for text, windows in data.evaluation_windows(tokenizer, texts, seq_len, n_windows).items():
        row = compare_on_windows(model, fp_model, windows, progress=progress).as_dict()
        if text in calibrated:
            row["calibrated_on"] = True  # a fit to this text, not a measure of fidelity
        per_text[text] = row
    prompts = [prompt_ids_for(tokenizer, q) for q in CHAT_QUESTIONS]
    fp_tokens = greedy_tokens(fp_model, prompts)
    fp_replies = chat_answers(fp_model, tokenizer)
    replies = chat_answers(model, tokenizer)
    asked = [i for i, r in enumerate(fp_replies) if answered(r)]
    return {"texts": per_text, "greedy_agreement": round(greedy_agreement(model, fp_tokens, prompts), 3),
            "greedy_tokens": len(fp_tokens[0]),
            "chat_answered": sum(answered(replies[i]) for i in asked), "chat_asked": len(asked),
            "chat": [{"question": q, "fp": a, "quantized": b} for q, a, b in zip(CHAT_QUESTIONS, fp_replies, replies)]}


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
