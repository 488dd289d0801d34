"""Training examples for E2E-QP: plain text windows (loss on every token) or instruction pairs
(loss on the response tokens only), one representation so the trainer never cares which.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import jsonl_records

IGNORE = -100


@dataclass
class Examples:
    """Token ids and labels per example; a label of -100 is not trained on (prompt, padding)."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def target_count(self, i: int) -> int:
        """Tokens of example `i` that contribute to the loss (labels are shifted by one)."""
        return int((self.labels[i][1:] != IGNORE).sum())

    @classmethod
    def from_windows(cls, windows: torch.Tensor) -> "Examples":
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise ValueError(f"expected token windows [n, seq_len] with n >= 1, got {tuple(windows.shape)}")
        rows = list(windows.long())
        return cls(rows, [r.clone() for r in rows])

    @classmethod
    def from_instructions(cls, path: str | Path, tokenizer, max_len: int = 512) -> "Examples":
        """A JSONL of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} records."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"instruction file {path} does not exist")
        ids, labels = [], []
        for where, record in jsonl_records(path):
            messages = _messages(record, where)
            x, y = _tokenize_chat(tokenizer, messages)
            x, y = x[:max_len], y[:max_len]
            if (y[1:] != IGNORE).any():
                ids.append(x)
                labels.append(y)
        if not ids:
            raise ValueError(f"{path} gives no example with response tokens within {max_len} tokens")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return cls(ids, labels, pad)


def collate(examples: Examples, indices: list[int]) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked out of attention and of the loss."""
    length = max(examples.input_ids[i].numel() for i in indices)
    ids = torch.full((len(indices), length), examples.pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = examples.input_ids[i].numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = examples.input_ids[i], examples.labels[i], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _messages(record: dict, where: str) -> list[dict]:
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message to train on")
        return msgs
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        return [{"role": "user", "content": str(record["prompt"])},
                {"role": "assistant", "content": str(record["response"])}]
    raise ValueError(f"{where}: an instruction record needs 'prompt' and 'response', or 'messages'")


def _tokenize_chat(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the whole conversation and labels that keep only the assistant turns' tokens."""
    if not getattr(tokenizer, "chat_template", None):
        return _tokenize_plain(tokenizer, messages)
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        full = render_chat(tokenizer, messages[:i + 1], generation_prompt=False)
        if full[:len(ids)] != ids:
            raise ValueError("the tokenizer's chat template does not render conversations prefix-consistently; "
                             "use a tokenizer without one or prompt/response records")
        if m["role"] == "assistant":
            prefix = render_chat(tokenizer, messages[:i], generation_prompt=True)
            if full[:len(prefix)] != prefix or len(prefix) < len(ids):
                raise ValueError("the chat template's generation prompt is not a prefix of the rendered reply")
            labels += [IGNORE] * (len(prefix) - len(ids)) + full[len(prefix):]
        else:
            labels += [IGNORE] * (len(full) - len(ids))
        ids = full
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation: the tokenizer's chat template, or without one the "role: content" lines
    of `_tokenize_plain` (what instruction tuning trains on) plus "assistant:" for a generation prompt.
    The one renderer behind instruction data, `eqat generate/chat`, fidelity and self-generation."""
    if not getattr(tokenizer, "chat_template", None):
        ids = _tokenize_plain(tokenizer, messages)[0].tolist()
        return ids + (tokenizer("assistant:", add_special_tokens=False).input_ids if generation_prompt else [])
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _tokenize_plain(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """No chat template: "role: content" lines, tokenized piece by piece so labels align exactly;
    an assistant reply ends with EOS so the model learns to stop."""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = tokenizer(f"{m['role']}:", add_special_tokens=False).input_ids
        body = tokenizer(f" {m['content']}\n", add_special_tokens=False).input_ids
        if m["role"] == "assistant" and tokenizer.eos_token_id is not None:
            body = body + [tokenizer.eos_token_id]
        ids += head + body
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else [IGNORE] * len(body))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
