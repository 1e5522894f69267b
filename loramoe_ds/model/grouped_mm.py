"""Grouped GEMM of rows sorted by expert: one ``torch.nn.functional.grouped_mm`` where it
runs, else one padded ``bmm`` (no Python loop over experts).

Shape legend (as :mod:`loramoe_ds.model.experts`): N rows sorted by expert, E
experts, K input and M output width of one factor.
:func:`grouped_mm_supported` says where the kernel exists (CUDA bf16 on SM80+;
CPU), :func:`group_align_rows` / :func:`aligned_rows` pad each expert's rows on
CUDA, :func:`grouped_matmul` is the GEMM.
"""

from __future__ import annotations

import torch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s CPU backward rejects expanded (stride-0) gradients such as
    the one produced by ``y.sum().backward()``.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


#: Oldest CUDA compute capability with a ``grouped_mm`` kernel: torch states
#: "bfloat16 values on CUDA devices with SM >= 80" (``torch.nn.functional.grouped_mm``).
GROUPED_MM_MIN_CAPABILITY = (8, 0)
#: On CUDA each expert's rows are padded to a multiple of this (8 bf16 rows = 16
#: bytes): the weight gradient of a grouped GEMM is a 2-D x 2-D grouped GEMM whose
#: groups run along the token dimension, and the kernels want every group
#: 16-byte aligned (torchtitan pads its MoE token groups to 8 for the same reason).
GROUP_ALIGN_ROWS = 8


def grouped_mm_supported(
    device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None
) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` has a kernel for this device and dtype.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ...
        dtype: The operands' dtype (both the same).
        capability: The CUDA device's compute capability (``None`` off CUDA).

    Returns:
        CPU: fp32 and bf16. CUDA: bf16 on SM80 or newer only (older GPUs and
        fp32 fall back to the padded ``bmm``). Other devices: no.
    """
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if device_type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device_type == "cuda":
        return (
            dtype == torch.bfloat16
            and capability is not None
            and tuple(capability) >= GROUPED_MM_MIN_CAPABILITY
        )
    return False


def _grouped_mm_ok(x_NK: torch.Tensor, w_EKM: torch.Tensor) -> bool:
    if x_NK.dtype != w_EKM.dtype:
        return False
    dev = x_NK.device
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    if not grouped_mm_supported(dev.type, x_NK.dtype, cap):
        return False
    size = x_NK.element_size()
    strides = [x_NK.stride(0), *w_EKM.stride()[1:]]
    # grouped GEMM kernels need 16-byte aligned leading strides
    return all((s * size) % 16 == 0 or s == 1 for s in strides) and (
        x_NK.shape[1] * size % 16 == 0 and w_EKM.shape[2] * size % 16 == 0
    )


def group_align_rows(x_ND: torch.Tensor, a_EDR: torch.Tensor, b_ERO: torch.Tensor) -> int:
    """Rows each expert's group is padded to in :meth:`ExpertBank.grouped`:
    :data:`GROUP_ALIGN_ROWS` where ``grouped_mm`` runs both GEMMs on a GPU, else 1
    (the CPU kernel and the padded-``bmm`` fallback take any group size)."""
    if x_ND.device.type != "cuda" or not _grouped_mm_ok(x_ND, a_EDR):
        return 1
    h_0R = x_ND.new_empty(0, a_EDR.shape[2])  # the layout of the rows between the GEMMs
    return GROUP_ALIGN_ROWS if _grouped_mm_ok(h_0R, b_ERO) else 1


def aligned_rows(
    counts_E: torch.Tensor, align: int, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of an expert-grouped batch goes when every group is padded
    to a multiple of ``align`` rows (no device->host read).

    Returns:
        ``dest_N`` (row n's place in the padded batch; the padded batch needs at
        most ``N + align * E`` rows) and the padded ``counts_E``.
    """
    counts_E = counts_E.to(torch.long)
    padded_E = (counts_E + align - 1) // align * align
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pstarts_E = torch.cumsum(padded_E, 0) - padded_E
    group_N = torch.repeat_interleave(
        torch.arange(counts_E.numel(), device=counts_E.device), counts_E, output_size=num_rows
    )
    row_N = torch.arange(num_rows, device=counts_E.device)
    return pstarts_E[group_N] + row_N - starts_E[group_N], padded_E


def grouped_matmul(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor, max_rows: int | None = None
) -> torch.Tensor:
    """Row-grouped matmul: rows of group e are multiplied by ``w_EKM[e]``.

    Uses ``torch.nn.functional.grouped_mm`` when the dtype and strides allow it,
    otherwise scatters the rows into one padded ``(E, C, K)`` batch and runs a
    single ``bmm``. Both are one kernel launch, not a loop over experts.

    Args:
        x_NK: Rows sorted by group.
        w_EKM: One ``K x M`` matrix per group.
        counts_E: Rows per group (rows past their sum are ignored).
        max_rows: ``max(counts_E)``, when known on the host (else the
            fallback reads it from the device).

    Returns:
        ``y_NM`` (as many rows as ``x_NK``).
    """
    E = w_EKM.shape[0]
    if x_NK.shape[0] == 0:
        return x_NK.new_zeros(0, w_EKM.shape[2]) + 0 * w_EKM.sum()
    if _grouped_mm_ok(x_NK, w_EKM):
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        y_NM = torch.nn.functional.grouped_mm(x_NK, w_EKM, offs=offs_E)
        return _ContiguousGrad.apply(y_NM)
    # Padded bmm fallback.
    counts_E = counts_E.to(torch.long)
    capacity = int(counts_E.max().item()) if max_rows is None else max_rows
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    group_N = torch.repeat_interleave(
        torch.arange(E, device=x_NK.device), counts_E, output_size=x_NK.shape[0]
    )
    slot_N = torch.arange(x_NK.shape[0], device=x_NK.device) - starts_E[group_N]
    flat_N = group_N * capacity + slot_N
    x_pad = x_NK.new_zeros(E * capacity, x_NK.shape[1]).index_copy(0, flat_N, x_NK)
    y_pad = torch.bmm(x_pad.view(E, capacity, -1), w_EKM)
    return y_pad.view(E * capacity, -1).index_select(0, flat_N)
