"""Expert utilisation: how much router weight each task type puts on the knowledge group.

Shape legend: B sequences, S positions, T = B*S tokens, E experts of a layer.

The LoRAMoE paper (Dou et al. 2023, fig. 5) plots, per decoder layer, the router
weight share of the world-knowledge experts for knowledge vs downstream inputs;
the localized balancing constraint should push it above 0.5 for knowledge
records and below 0.5 for downstream ones. Here, for each decoder layer ``l``
and task type ``c`` (1 world knowledge, 0 downstream)::

    share[l, c] = mean over adapted linears j of layer l of
                  sum_{tokens t of type-c sequences, m[t] = 1} sum_{e in K} w_j[t, e]
                  / #{real tokens of type-c sequences}

with ``K = {e : e < E/2}`` plus the null experts, if any
(:func:`~loramoe_ds.model.losses.knowledge_group`),
``w`` the fp32 router softmax ``probs_TE`` (for top-k routers: the probabilities
before the top-k cut) and ``m`` the attention mask: padding never counts. The
tokens are the prompt (training format) + the gold answer + EOS, exactly the
training sequence. The per-expert mean probability (``expert_probs``) is kept
too for a heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from loramoe_ds.eval.common import DEFAULT_BATCH_SIZE, PromptEncoder, batches, by_length, pad_batch
from loramoe_ds.model.lm import LoRAMoEModel
from loramoe_ds.model.losses import knowledge_group
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.router import Routing

TASK_TYPE_NAMES = {1: "knowledge", 0: "downstream"}
"""Task type -> key used in the returned dicts."""


class UtilisationRecorder:
    """Accumulates masked router mass per (layer, task type) across forwards.

    Set as ``layer.recorder`` on every :class:`MoELoRALinear`; before each
    forward assign :attr:`mask_T` (1 = real token) and :attr:`task_type`.
    """

    def __init__(self) -> None:
        self.mask_T: torch.Tensor | None = None
        self.task_type: int = 0
        # (layer_idx, task_type) -> [sum of knowledge mass, sum of token-count,
        #                             per-expert prob sum (E,)]
        self.sums: dict[tuple[int, int], list[Any]] = {}
        self.linears: dict[int, set[str]] = {}

    def record(self, layer: MoELoRALinear, routing: Routing) -> None:
        assert self.mask_T is not None, "set recorder.mask_T before the forward"
        m_T = self.mask_T.to(routing.probs_TE.device, torch.float32)
        w_TE = routing.probs_TE.float() * m_T[:, None]
        know_E = knowledge_group(routing.num_experts, w_TE.device, routing.num_null)
        acc = self.sums.setdefault(
            (layer.layer_idx, self.task_type),
            [0.0, 0.0, torch.zeros(routing.num_slots, dtype=torch.float64)],
        )
        acc[0] += float(w_TE[:, know_E].sum(dtype=torch.float64))
        acc[1] += float(m_T.sum(dtype=torch.float64))
        acc[2] += w_TE.sum(0, dtype=torch.float64).cpu()
        self.linears.setdefault(layer.layer_idx, set()).add(layer.name)


def _sequences(enc: PromptEncoder, records: Sequence[dict]) -> list[list[int]]:
    prompts = enc.prompts(records)
    answers = enc.answers([r["output"] for r in records])
    return [p + a + [enc.eos_id] for p, a in zip(prompts, answers)]


@torch.inference_mode()
def expert_utilisation(
    model: LoRAMoEModel,
    enc: PromptEncoder,
    records: Sequence[dict],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """Router weight share of the knowledge expert group, per layer and task type.

    Args:
        model: The adapter model.
        enc: Prompt encoder (training's prompt format).
        records: Records of both task types (``task_type`` 1 or 0; records
            without one count as downstream).
        batch_size: Sequences per forward (right padding, masked).

    Returns:
        ``{"layers": [l...], "num_experts": [E_l...], "linears_per_layer": [...],
        "knowledge_share": {"knowledge": [...], "downstream": [...]},
        "expert_probs": {"knowledge": [[p_e...] per layer], ...},
        "tokens": {"knowledge": n, "downstream": n}, "sequences": {...}}``;
        a task type with no records is absent from the per-type dicts.

    Raises:
        ValueError: If ``model`` is not a :class:`LoRAMoEModel`.
    """
    if not isinstance(model, LoRAMoEModel):
        raise ValueError("expert utilisation needs an adapter model (pass --adapter)")
    lm = model.base
    lm.eval()
    dev = next(lm.parameters()).device
    decoder = lm.get_decoder()
    rec = UtilisationRecorder()
    layers = model.moe_layers()
    seqs = _sequences(enc, records)
    types = [int(r.get("task_type", 0) or 0) for r in records]
    n_seq: dict[int, int] = {}
    tokens: dict[int, int] = {}
    for layer in layers:
        layer.recorder = rec
    try:
        for c in sorted(set(types), reverse=True):
            idx_c = [i for i, t in enumerate(types) if t == c]
            n_seq[c] = len(idx_c)
            rec.task_type = c
            for sub in batches(by_length([seqs[i] for i in idx_c]), batch_size):
                ids_BS, mask_BS = pad_batch([seqs[idx_c[j]] for j in sub], enc.pad_id, False, dev)
                rec.mask_T = mask_BS.reshape(-1)
                tokens[c] = tokens.get(c, 0) + int(mask_BS.sum())
                decoder(input_ids=ids_BS, attention_mask=mask_BS)
    finally:
        for layer in layers:
            layer.recorder = None
    layer_ids = sorted(rec.linears)
    out: dict[str, Any] = {
        "layers": layer_ids,
        "num_experts": [model.experts_per_layer[i] for i in layer_ids],
        "null_experts": model.cfg.null_experts,
        "linears_per_layer": [len(rec.linears[i]) for i in layer_ids],
        "knowledge_share": {},
        "expert_probs": {},
        "tokens": {TASK_TYPE_NAMES[c]: n for c, n in tokens.items()},
        "sequences": {TASK_TYPE_NAMES[c]: n for c, n in n_seq.items()},
    }
    for c in sorted(n_seq, reverse=True):  # knowledge first
        name = TASK_TYPE_NAMES[c]
        shares, probs = [], []
        for i in layer_ids:
            mass, count, per_e = rec.sums[(i, c)]
            # All linears of a layer see the same tokens, so the pooled ratio is
            # the mean over linears of each linear's token-average share.
            shares.append(mass / count)
            probs.append((per_e / count).tolist())
        out["knowledge_share"][name] = shares
        out["expert_probs"][name] = probs
    return out
