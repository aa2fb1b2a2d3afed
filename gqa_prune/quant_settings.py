"""Settings of ``quantize`` and the CPU kernels that run its output, importable without torch: the CLI refuses
what a kernel cannot take with ``QuantSettings.validate()``, and the workflow's config check calls the same.

The checks that need the model's shapes (a group size must divide every ``in_features``) stay in
``quantize.check_settings``, which runs this validation first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SettingError

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class CpuKernel:
    """What a GPTQModel CPU inference kernel accepts, as measured with gptqmodel 7.6 on torch 2.13."""

    backend: str  # gptqmodel BACKEND value
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    group_divides_in_features: bool
    note: str


KERNELS = {
    # ATen int4pack: the fast one; the op itself rejects group size 16 although the class lists it
    "torch_aten": CpuKernel("gptq_torch_aten", (4,), (32, 64, 128), True, "fast int4 CPU kernel"),
    "torch_int8": CpuKernel("gptq_torch_int8", (2, 4, 8), (16, 32, 64, 128), False, "int8 fused CPU kernel"),
    "torch": CpuKernel("gptq_torch", (2, 3, 4, 5, 6, 7, 8), (16, 32, 64, 128, 256, 512, 1024), False, "generic, slow"),
}


def kernel_for(bits: int, kernel: str = "auto") -> str:
    """The CPU kernel that runs ``bits``-bit weights: ``kernel`` itself unless "auto"."""
    if kernel != "auto":
        return kernel
    return {4: "torch_aten", 8: "torch_int8"}.get(bits, "torch")


@dataclass(frozen=True)
class QuantSettings:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    kernel: str = "auto"  # CPU kernel for inference: auto picks torch_aten for 4 bits, torch_int8 for 8 (torch: MoE)

    @property
    def id(self) -> str:
        """Readable, stable artefact id: gptq-w4g64, rtn-w8g64."""
        return f"{self.method}-w{self.bits}g{self.group_size}"

    def resolved_kernel(self) -> str:
        return kernel_for(self.bits, self.kernel)

    def validate(self) -> CpuKernel:
        """Refuse a method, bit width or group size the chosen kernel cannot take (a ``SettingError`` naming the
        field and what would work); returns the kernel."""
        if self.method not in METHODS:
            raise SettingError(
                f"quantization method {self.method!r} is not one of {', '.join(METHODS)}", field="method"
            )
        name = self.resolved_kernel()
        if name not in KERNELS:
            raise SettingError(f"kernel {name!r} is not one of auto, {', '.join(KERNELS)}", field="kernel")
        kernel = KERNELS[name]
        if self.bits not in kernel.bits:
            able = sorted(k for k, spec in KERNELS.items() if self.bits in spec.bits)
            raise SettingError(
                f"bits {self.bits} is not supported by the {name} kernel (bits {', '.join(map(str, kernel.bits))}); "
                f"kernels with {self.bits} bits: {', '.join(able) or 'none'}",
                field="bits",
            )
        if self.group_size not in kernel.group_sizes:
            raise SettingError(
                f"group size {self.group_size} is not supported by the {name} kernel "
                f"(group sizes {', '.join(map(str, kernel.group_sizes))})",
                field="group_size",
            )
        return kernel
