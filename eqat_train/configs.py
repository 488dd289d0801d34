"""Every setting of a run, each written once as a dataclass field; the `eqat` flags are generated from them.

`RunConfig` holds data, I/O and the run-wide numeric mode (seed, bf16); each stage has its own config
(`block_ap.BlockAPConfig`, `baselines.RTNConfig` / `GPTQConfig`, `e2e_qp.E2EConfig`). A field's metadata
carries its help text (and `choices`), so `eqat quantize --help` states the dataclass default, and a new
option is one new field. Where a default depends on the bit-width (learning rates, Block-AP's init) the
field is `None` and the stage fills it in; the help says how.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, dataclass, field, fields

from .data import DEFAULT_EVAL_TEXTS, EVAL_WINDOWS
from .selfgen import SelfGenConfig

# A non-finite loss restores the last good state and retries once at this fraction of the learning rate
# (Block-AP per block, E2E-QP from its last save).
LR_RETRY_FACTOR = 0.1


def published_lr(bits: int) -> float:
    """EfficientQAT's learning rate for weights (Block-AP) and scales (E2E-QP): 2e-5 at 2 bits, else 1e-5."""
    return 2e-5 if bits == 2 else 1e-5


def option(default, help: str, **meta):
    """A dataclass field with CLI metadata: `help`, and optionally `choices`, `cli=False` (API only) or
    `flag` (the option's name when it differs from the field's)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class RunConfig:
    """Data, I/O and the run-wide numeric mode, shared by `eqat quantize` and `eqat e2e`."""

    model: str | None = option(None, "model folder, .gguf file or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    out: str | None = option(None, "output folder (default for quantize: runs/<model>-w<b>g<g>-<method>)")
    text: str | None = option(None, "calibration source: self (default: text the fp model writes itself, cached), "
                                    "stdlib, fortunes, code, licenses, a .txt/.jsonl file, hf:NAME, or a mixture "
                                    "such as self+stdlib")
    seq_len: int = option(512, "tokens per calibration and evaluation window")
    calib_windows: int = option(128, "calibration windows (w2g64 validation KL, mean of seeds: 64 1.65, 128 1.49, "
                                     "256 1.21 at twice the time, 512 1.13 (seed 0) at ~3x; docs/RESULTS.md)")
    val_windows: int = option(4, "held-out windows for the per-block validation loss")
    eval_windows: int = option(16, "windows per text in the closing fidelity report, a quick look (`eqat eval` "
                                   f"measures on {EVAL_WINDOWS}; calibration never takes those)")
    eval_texts: list[str] = option(list(DEFAULT_EVAL_TEXTS),
                                   "texts to report fidelity on (never calibrated on); none: skip evaluation")
    fidelity: bool = option(True, "compare with the fp model at the end (KL, top-1, greedy and chat agreement)")
    bf16: bool = option(True, "train and run block passes under bf16 autocast (fp32 master weights)")
    offload: bool = option(False, "keep cached activations memory-mapped on disk")
    seed: int = option(0, "seed of data sampling, self-generation and training")
    gen_temperature: float = option(SelfGenConfig.temperature, "self-generation: sampling temperature (above 1 the "
                                                               "fp model writes less typical text; docs/RESULTS.md)")
    gen_top_k: int = option(SelfGenConfig.top_k, "self-generation: tokens sampled from at each step (the k most likely)")
    gen_chat_fraction: float = option(SelfGenConfig.chat_fraction, "self-generation: share of windows cut from "
                                                                   "conversations (chat models; the rest plain text)")

    @property
    def held_out_windows(self) -> int:
        """Leading windows of a calibration text kept for evaluation: `eqat eval`'s and the report's."""
        return max(EVAL_WINDOWS, self.eval_windows)

    def __post_init__(self):
        if self.calib_windows < 1:
            raise ValueError("calibration needs at least one window (calib_windows >= 1)")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        SelfGenConfig(sequences=1, seq_len=8, **self.sampling)  # its checks, before any model is loaded

    @property
    def sampling(self) -> dict:
        """The self-generation settings a run chooses (`SelfGenConfig` fields)."""
        return {"temperature": self.gen_temperature, "top_k": self.gen_top_k, "chat_fraction": self.gen_chat_fraction}


# ----- CLI generation ------------------------------------------------------------------------------------
def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in fields(cls) if f.init and f.metadata.get("cli", True)]


def field_default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default")


def _flag(f: dataclasses.Field, prefix: str) -> str:
    return "--" + prefix + f.metadata.get("flag", f.name).replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, *classes, prefix: str = "", exclude: tuple[str, ...] = (),
              help_overrides: dict[str, str] | None = None) -> None:
    """One flag per CLI field of `classes` (a field name shared by several classes becomes one flag; their
    defaults must agree). Flags default to SUPPRESS so `build` can tell what was given; help states the
    dataclass default."""
    seen: dict[str, object] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in cli_fields(cls):
            if f.name in exclude:
                continue
            default = field_default(f)
            if f.name in seen:
                if seen[f.name] != default:
                    raise TypeError(f"{f.name} has different defaults in {classes}")
                continue
            seen[f.name] = default
            help_text = (help_overrides or {}).get(f.name, f.metadata["help"]).replace("%", "%%")  # argparse formats help
            kind, is_list = _base_type(hints[f.name])
            kwargs = {"dest": prefix.replace("-", "_") + f.name, "default": argparse.SUPPRESS}
            if kind is bool:
                if default:
                    parser.add_argument("--" + prefix + "no-" + f.name.replace("_", "-"), action="store_false",
                                        help=f"turn off (on by default): {help_text}", **kwargs)
                else:
                    parser.add_argument(_flag(f, prefix), action="store_true", help=help_text, **kwargs)
                continue
            if default is not None:  # None: the help says what happens
                help_text += f" (default: {' '.join(default) if is_list else default})"
            if is_list:
                kwargs["nargs"] = "*"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(_flag(f, prefix), type=kind, help=help_text, **kwargs)


def _base_type(hint) -> tuple[type, bool]:
    """(element type, is a list) of `int`, `float | None`, `list[str]`, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return args[0], True
    if args:  # X | None
        return _base_type(args[0])
    return hint, False


def given(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    """The fields of `cls` that were given on the command line."""
    dest = prefix.replace("-", "_")
    return {f.name: getattr(args, dest + f.name) for f in cli_fields(cls) if hasattr(args, dest + f.name)}


def build(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """`cls` from the flags given (every other field keeps its dataclass default)."""
    return cls(**{**given(args, cls, prefix), **extra})
