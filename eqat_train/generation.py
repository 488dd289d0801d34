"""Text generation with a KV cache through transformers' `generate`, streamed token by token.

Packed QuantLinear layers pick their kernel by device (Triton on CUDA, torch's int4 kernel on CPU), so
the same call serves a quantized checkpoint and an fp model.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def prompt_ids(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> torch.Tensor:
    """Token ids `[1, L]` of a plain prompt, or of a conversation rendered with the chat template."""
    if messages is not None:
        from .examples import render_chat

        return torch.tensor([render_chat(tokenizer, messages)])
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | None = None, messages: list[dict] | None = None,
             max_new_tokens: int = 64, stream: bool = False, do_sample: bool = False) -> str:
    """Greedy (default) continuation of `prompt` or of a chat; printed as it comes when `stream`."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt, messages).to(next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=do_sample, use_cache=True, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def chat_loop(model: nn.Module, tokenizer, max_new_tokens: int = 256, system: str | None = None,
              read=None, write=None) -> int:
    """Read a line, answer it (streamed), keep the conversation; returns the number of turns."""
    read, write = read or input, write or sys.stdout.write
    messages = [{"role": "system", "content": system}] if system else []
    turns = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        write("model> ")
        reply = generate(model, tokenizer, messages=messages, max_new_tokens=max_new_tokens, stream=True)
        messages.append({"role": "assistant", "content": reply})
        turns += 1
    return turns
