"""The static kernel performance model (benchmarks/kernel_model.py): its SASS reading is right on a known
loop, and no kernel's instructions per weight byte or predicted time got worse than the committed JSON.
Builds run in a subprocess without TRITON_INTERPRET (the suite interprets Triton)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_model  # noqa: E402

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LOP3.LUT R8, R4, 0xf, RZ, 0xc0, !PT ;
        /*0030*/                   I2FP.F32.U32 R9, R8 ;
        /*0040*/                   FFMA R10, R9, R5, R10 ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_the_main_loop_and_its_mix_are_read_from_sass():
    loop = kernel_model.main_loop(kernel_model.parse_sass(SASS))
    assert [op for _, op, _, _ in loop] == ["LDG", "LOP3", "I2FP", "FFMA", "BRA"]
    mix = kernel_model.mix(loop)
    assert mix["global_load"] == 1 and mix["LDG_E_128"] == 1 and mix["int_bit"] == 1 and mix["convert"] == 1
    assert mix["fma"] == 1 and mix["total"] == 5


def test_the_issue_budget_matches_the_datasheets():
    """About 10 thread-instructions per byte of HBM bandwidth on H100, ~9.5 on A100 (docs/DESIGN.md)."""
    h100, a100 = kernel_model.GPUS["H100"], kernel_model.GPUS["A100"]
    assert 9.5 < h100.issue_rate / h100.bandwidth < 10.5
    assert 9.0 < a100.issue_rate / a100.bandwidth < 10.0


def test_no_kernel_regressed_against_the_committed_predictions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_model.py"), "--check"], env=env,
                         capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no regression" in out.stdout
    committed = json.loads((ROOT / "benchmarks" / "results" / "kernel_model.json").read_text())
    assert all(r["label"] == "predicted" for r in committed)
    assert {r["gpu"] for r in committed} == {"A100", "H100"}


def test_the_regression_check_flags_a_worse_kernel():
    base = {"gpu": "H100", "op": "forward", "bits": 4, "group_size": 128, "M": 1, "N": 4096, "K": 4096,
            "instr_per_weight_byte": 10.0, "predicted_us": 8.0}
    assert kernel_model.check([dict(base)], [base]) == []
    assert kernel_model.check([{**base, "predicted_us": 9.0}], [base])
    assert kernel_model.check([{**base, "instr_per_weight_byte": 10.5}], [base])
    assert kernel_model.check([{**base, "instr_per_weight_byte": 9.0}], [base]) == []  # better is fine


def test_slow_pipes_bound_a_loop_beyond_its_instruction_count():
    """Conversions run at 16 per clock per SM, integer ops at 64, against 128 issue slots (CUDA guide table)."""
    h100, a100 = kernel_model.GPUS["H100"], kernel_model.GPUS["A100"]
    assert kernel_model.issue_slots({"fma": 30, "int_bit": 10}, h100) == (40, "issue")
    assert kernel_model.issue_slots({"convert": 10, "fma": 10}, h100) == (80, "convert")
    assert kernel_model.issue_slots({"int_bit": 30, "fma": 5}, h100) == (60, "int_bit")
    assert kernel_model.issue_slots({"fma": 30, "int_bit": 10}, a100) == (60, "fma")  # A100: 64 fp32 lanes per SM
