"""What the host's CPU is, for perf results and test headers: model name, ISA flags that decide speed and
int8 exactness (AVX2, AVX-512, VNNI, BF16, AMX), usable cores. The detection itself lives in the CPU backbone
model (`triton_models/onnx_cpu.py`, imported from here: the served model is the one owner), which makes the same decisions when it loads on a serving host."""

from __future__ import annotations

from typing import Any

from vitserve.exporter.triton_models.onnx_cpu import AMX_FLAGS, cpu_flags, host_isa, int8_isa, usable_cores

ISA_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "AVX512-VNNI": ("avx512_vnni",),
    "AVX-VNNI": ("avx_vnni",),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX": AMX_FLAGS,
}


def _model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_info() -> dict[str, Any]:
    """{model, isa: [...], cpu_class: amx|bf16|vnni|avx2, int8_isa: vnni|avx2, usable_cores}; the classes
    honour VITSERVE_CPU_ISA."""
    flags = cpu_flags()
    return {
        "model": _model_name(),
        "isa": [name for name, any_of in ISA_FLAGS.items() if any(f in flags for f in any_of)],
        "cpu_class": host_isa(flags),
        "int8_isa": int8_isa(flags),
        "usable_cores": usable_cores(),
    }


def cpu_summary() -> str:
    """One line: 'MODEL; ISA: AVX2, AVX-512, ...; CPU class: bf16; int8 kernels: vnni; N usable cores'."""
    info = cpu_info()
    return (
        f"{info['model']}; ISA: {', '.join(info['isa']) or 'none of AVX2/AVX-512/VNNI/BF16/AMX'}; "
        f"CPU class: {info['cpu_class']}; int8 kernels: {info['int8_isa']}; {info['usable_cores']} usable core(s)"
    )


if __name__ == "__main__":
    print(cpu_summary())
