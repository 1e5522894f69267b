"""Plain per-expert Python-loop references (the original LoRAMoE algorithm).

Used by tests (fused == loop) and ``bench/layer.py`` (fused vs loop speed).
Never used on the training hot path.
"""

from __future__ import annotations

import torch

from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.model.router import Routing


def loop_mixture(bank: ExpertBank, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``sum_k g_k B_{e_k} A_{e_k} x`` by looping over experts, one masked matmul each.

    Soft routing: every expert on every token, weighted by its gate, exactly as
    the LoRAMoE reference code (``for i in range(E): out += g[..., i] * B_i(A_i(x))``).
    Top-k: for each expert, the tokens that chose it.
    """
    y_TO = x_TD.new_zeros(x_TD.shape[0], bank.out_features)
    for e in range(bank.num_experts):
        a_RD, b_RO = bank.lora_A[e], bank.lora_B[e]
        if routing.is_soft:
            g_T = routing.gates_TK[:, e].to(x_TD.dtype)
            y_TO = y_TO + g_T[:, None] * ((x_TD @ a_RD.t()) @ b_RO)
        else:
            hit_TK = routing.experts_TK == e
            g_T = (routing.gates_TK * hit_TK).sum(-1).to(x_TD.dtype)
            tok = hit_TK.any(-1).nonzero().squeeze(-1)
            if tok.numel():
                part = (x_TD[tok] @ a_RD.t()) @ b_RO
                y_TO = y_TO.index_add(0, tok, g_T[tok, None] * part)
    return y_TO
