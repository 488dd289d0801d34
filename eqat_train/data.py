"""Text in, token windows out: the calibration and evaluation data of every stage.

Default text is the standard library's `pydoc_data.topics` (no download). Evaluation takes the first
windows; calibration samples from the windows after them, so the two never overlap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TEXT = "stdlib"
SELF = "self"  # calibration written by the fp model itself (selfgen.py)
OTHER_GENRE_FILES = ("literature", "wisdom", "people", "art", "love")  # Debian's `fortunes` package
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def stdlib_text() -> str:
    """The Python documentation topics shipped with CPython (~465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def fortunes_text(directory: Path = FORTUNES_DIR) -> str:
    """Quotations from literature and people (Debian's `fortunes`): a genre far from Python docs."""
    missing = [name for name in OTHER_GENRE_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}: install Debian's `fortunes` package "
                                "(apt-get install fortunes) or pass another text file")
    parts = []
    for name in OTHER_GENRE_FILES:
        raw = (directory / name).read_text(encoding="utf-8", errors="replace")
        parts += [q.strip() for q in raw.split("\n%\n") if q.strip()]
    return "\n\n".join(parts)


CODE_MODULES = ("argparse", "dataclasses", "functools", "heapq", "shutil", "textwrap", "fractions", "statistics",
                "difflib", "calendar")  # pure-Python standard library modules: a source-code genre
LICENSES_DIR = Path("/usr/share/common-licenses")


def code_text() -> str:
    """Source code of pure-Python standard library modules (always there with CPython)."""
    import importlib
    import inspect

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


def licenses_text(directory: Path = LICENSES_DIR) -> str:
    """Software licences (Debian's base-files): legal prose, the held-out text for choosing settings."""
    files = sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory} has no licence texts (a Debian/Ubuntu base system has them)")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


NAMED_TEXTS = {"stdlib": stdlib_text, "fortunes": fortunes_text, "code": code_text, "licenses": licenses_text}


def load_text(source: str | None = None) -> str:
    """`None`/"stdlib": the Python docs; "fortunes": quotations; "code": stdlib source; "licenses": licence
    texts (held out for choosing settings); a `.txt` file; a `.jsonl`
    file (its "text" field, or prompt + response); or `hf:NAME[:CONFIG][:SPLIT]` for a `datasets` dataset."""
    if source is None:
        source = DEFAULT_TEXT
    if source in NAMED_TEXTS:
        return _non_empty(NAMED_TEXTS[source](), f"the {source} text")
    if source == SELF:
        raise ValueError("'self' (self-generated calibration) is a calibration source, not a text to evaluate on")
    if source.startswith("hf:"):
        return _non_empty(_dataset_text(source[3:]), source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither a known name ({', '.join(NAMED_TEXTS)}), "
                                "an hf:dataset, nor an existing file")
    if path.suffix == ".jsonl":
        return _non_empty(_jsonl_text(path), str(path))
    return _non_empty(path.read_text(encoding="utf-8"), str(path))


def _non_empty(text: str, what: str) -> str:
    if not text.strip():
        raise ValueError(f"{what} is empty: nothing to calibrate or evaluate on")
    return text


def jsonl_records(path: Path):
    """(where, record) per non-blank line of a JSONL file; a broken line is named by file and number."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON: {e.msg}") from None


def _jsonl_text(path: Path) -> str:
    docs = []
    for where, record in jsonl_records(path):
        if "text" in record:
            docs.append(str(record["text"]))
        elif "prompt" in record and "response" in record:
            docs.append(f"{record['prompt']}\n{record['response']}")
        else:
            raise ValueError(f"{where} has neither a 'text' field nor 'prompt' and 'response'")
    return "\n\n".join(docs)


def _dataset_text(spec: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: text sources need the `datasets` package (pip install datasets)") from e
    name, config, split = (spec.split(":") + [None, None])[:3]
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column])


@dataclass
class TextWindows:
    """Non-overlapping token windows `[n, seq_len]`, split into evaluation and calibration sets."""

    eval: torch.Tensor
    calib: torch.Tensor
    val: torch.Tensor


def tokenize_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize once and cut into non-overlapping windows of `seq_len` tokens (the tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def split_windows(windows: torch.Tensor, n_eval: int, n_calib: int, n_val: int = 0, seed: int = 0) -> TextWindows:
    """First `n_eval` windows evaluate; calibration and validation are drawn (seeded) from the rest."""
    rest = windows.shape[0] - n_eval
    if n_eval < 0 or n_calib < 0 or n_val < 0:
        raise ValueError("window counts must be non-negative")
    if n_calib + n_val > rest:
        raise ValueError(f"{windows.shape[0]} windows cannot give {n_eval} for evaluation plus {n_calib} "
                         f"for calibration and {n_val} for validation without overlap")
    order = torch.randperm(rest, generator=torch.Generator().manual_seed(seed)) + n_eval
    return TextWindows(eval=windows[:n_eval], calib=windows[order[:n_calib]],
                       val=windows[order[n_calib:n_calib + n_val]])


DEFAULT_CALIBRATION = SELF
DEFAULT_EVAL_TEXTS = ("stdlib", "fortunes", "code")  # reported genres; "licenses" is for choosing settings
EVAL_WINDOWS = 40  # windows per text that `eqat eval` measures on; calibration never takes them


def calibration_sources(spec: str | None) -> list[str]:
    """`self`, a text source, or a mixture `a+b+...` of them."""
    parts = [p.strip() for p in (spec or DEFAULT_CALIBRATION).split("+")]
    if not all(parts):
        raise ValueError(f"calibration source {spec!r} has an empty part")
    return parts


def calibration_split(spec: str | None, model, tokenizer, seq_len: int, n_eval: int, n_calib: int, n_val: int,
                      seed: int = 0, progress: bool = True, sampling: dict | None = None) -> TextWindows:
    """Calibration and validation windows from `spec`, shared evenly between the parts of a mixture.
    Windows of a text never come from its first `n_eval` (those evaluate); self-generated windows are
    fresh samples of the fp model, drawn with `sampling` (`SelfGenConfig` fields; its defaults otherwise)."""
    parts = calibration_sources(spec)
    calib, val = [], []
    for j, part in enumerate(parts):
        c = n_calib // len(parts) + (1 if j < n_calib % len(parts) else 0)
        v = n_val // len(parts) + (1 if j < n_val % len(parts) else 0)
        if part == SELF:
            from .selfgen import SelfGenConfig, generate_calibration

            from . import runstate

            rank, world = runstate.rank_world()
            if world > 1 and rank != 0:
                torch.distributed.barrier()  # under torchrun rank 0 writes the cache, the others read it
            gen = SelfGenConfig(sequences=c + v, seq_len=seq_len, seed=seed, **(sampling or {}))
            windows = generate_calibration(model, tokenizer, gen, progress=progress)
            if world > 1 and rank == 0:
                torch.distributed.barrier()
            calib.append(windows[:c])
            val.append(windows[c:])
        else:
            split = split_windows(tokenize_windows(tokenizer, load_text(part), seq_len), n_eval, c, v, seed)
            calib.append(split.calib)
            val.append(split.val)
    return TextWindows(eval=torch.empty(0, seq_len, dtype=torch.long), calib=torch.cat(calib), val=torch.cat(val))


def overlapping_texts(calibration: str | None, eval_texts: list[str]) -> list[str]:
    """Evaluation texts that are also calibration sources: numbers on them measure fitting, not fidelity."""
    return [t for t in eval_texts if t in calibration_sources(calibration)]


def evaluation_windows(tokenizer, texts: list[str], seq_len: int, n_windows: int) -> dict[str, torch.Tensor]:
    """The first `n_windows` windows of each text; a text that is not on this machine is skipped, said so."""
    out = {}
    for text in texts:
        try:
            out[text] = tokenize_windows(tokenizer, load_text(text), seq_len)[:n_windows]
        except FileNotFoundError as e:
            print(f"skipping evaluation on {text}: {e}")
    return out
