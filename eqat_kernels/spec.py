"""What a quantized linear layer is: bit-width, group size and shape, validated once.

Every other module takes a `QuantSpec` instead of loose ints, so the rules of docs/DESIGN.md section 1
(supported bits, group sizes, the 32-element packing unit, the partial last group) live here only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
PACK_UNIT = 32  # K and N multiples of 32 make every bit-width pack into whole int32 words


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one `[out_features, in_features]` weight, `G = ceil(K / g)` groups along K."""

    bits: int
    group_size: int
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        for name, value in (("in_features", self.in_features), ("out_features", self.out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value % PACK_UNIT:
                raise ValueError(
                    f"{name}={value} is not a multiple of {PACK_UNIT}: int{self.bits} codes pack "
                    f"{PACK_UNIT} at a time along K (qweight) and N (qzeros)"
                )

    @property
    def group(self) -> int:
        """Effective group size: `-1` means one group spanning all of K."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def num_groups(self) -> int:
        return math.ceil(self.in_features / self.group)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def qweight_shape(self) -> tuple[int, int]:
        return (self.in_features * self.bits // 32, self.out_features)

    @property
    def qzeros_shape(self) -> tuple[int, int]:
        return (self.num_groups, self.out_features * self.bits // 32)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.num_groups, self.out_features)

    @property
    def bits_per_weight(self) -> float:
        """Storage cost with fp16 scales and b-bit zeros: `b + (b + 16) / g`."""
        return self.bits + (self.bits + 16) / self.group


def check_bits(bits: object) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}: eqat quantizes to {SUPPORTED_BITS} bits")
    return bits


def check_group_size(group_size: object) -> int:
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size not in SUPPORTED_GROUP_SIZES
    ):
        raise ValueError(
            f"unsupported group_size={group_size!r}: use one of {SUPPORTED_GROUP_SIZES} "
            "(-1 = one group over all input features)"
        )
    return group_size
