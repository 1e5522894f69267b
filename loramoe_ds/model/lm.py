"""The LM forward of an injected model: the LM loss at labelled positions and the aux losses.

Shape legend: B rows, S positions, T = B*S tokens, D hidden, V vocabulary,
E experts, K top-k, L labelled positions, N records (rows of an unpacked batch,
or segments of packed rows), C columns of gathered per-record sums.

:class:`LoRAMoEModel` (built by :func:`~loramoe_ds.model.inject.inject`) takes
the batch (``input_ids, attention_mask, labels, task_type``) and returns a
:class:`LoRAMoEOutput`: the LM loss, each auxiliary loss and their weighted
total. Packed rows (several records per row) are described by ``position_ids``
and ``seq_ids`` (see :meth:`LoRAMoEModel.forward`). The output head runs only at
labelled positions (:meth:`LoRAMoEModel._lm_loss_sum`). Per-forward routing
information reaches the losses through a recorder object that lives only for
the duration of one forward (no module globals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.aux_losses import AuxGather, Recorder, aux_losses, records_of_batch
from loramoe_ds.model.moe_linear import MoELoRALinear


@dataclass
class LoRAMoEOutput(ModelOutput):
    """Result of :meth:`LoRAMoEModel.forward` (a ``ModelOutput``: ZeRO-3 hooks see its tensors).

    Attributes:
        loss: ``lm_loss + lbc_beta*lbc + sup_coef*router_supervision
            + lb_coef*load_balance + z_coef*z``.
        lm_loss: Next-token cross-entropy summed over labelled positions, divided by
            ``num_items_in_batch`` when given, else by this batch's labelled count.
        lm_loss_sum: The sum itself (fp32), for token-mean reductions across ranks.
        lbc_loss: Sum over adapted linears of the LBC (unweighted).
        router_supervision_loss: Mean over adapted linears of the router
            supervision loss (unweighted; 0 when its coefficient is 0).
        load_balance_loss: Sum over decoder layers of the load-balancing loss.
        z_loss: Sum over adapted linears of the router z-loss.
        logits: Full logits (only when ``labels`` is None).
        num_label_tokens: Labelled positions in the batch.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    lbc_loss: torch.Tensor | None = None
    router_supervision_loss: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: int | None = None


class LoRAMoEModel(nn.Module):
    """A causal LM with routed LoRA experts and explicit auxiliary losses.

    Args:
        base: The injected ``transformers`` model.
        cfg: Adapter configuration.
        experts_per_layer: Resolved expert count of each decoder layer.
    """

    def __init__(self, base: nn.Module, cfg: AdapterConfig, experts_per_layer: list[int]):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.experts_per_layer = list(experts_per_layer)
        # Plain attribute (not a submodule), set from outside for
        # aux_loss_scope="global_batch": rows -> rows of every data-parallel rank.
        self.aux_gather: AuxGather | None = None

    # -- structure -------------------------------------------------------
    def moe_layers(self) -> list[MoELoRALinear]:
        """Every adapted linear, in module order."""
        return [m for m in self.base.modules() if isinstance(m, MoELoRALinear)]

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, param) of every router and expert weight, names relative to ``base``."""
        out = []
        for layer in self.moe_layers():
            for pname, p in layer.named_parameters():
                if pname.startswith(("router.", "experts.")):
                    out.append((f"{layer.name}.{pname}", p))
        return out

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable parameters: routers and experts."""
        return [p for _, p in self.adapter_named_parameters()]

    def total_experts(self) -> int:
        """Experts summed over all adapted linears (compare allocations at equal budget)."""
        return sum(layer.num_experts for layer in self.moe_layers())

    # -- forward ---------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_type: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
        **kwargs,
    ) -> LoRAMoEOutput:
        """Run the LM and compute the LM and auxiliary losses.

        Args:
            input_ids: ``(B, S)`` token ids.
            attention_mask: ``(B, S)``, 1 for real tokens (default: all ones).
                Ignored for packed rows (``seq_ids`` given).
            labels: ``(B, S)``, -100 where no loss is taken; the loss at position
                t predicts ``labels[t]`` from tokens ``< t`` (HF convention).
            task_type: 1 = world knowledge, 0 = downstream: ``(B,)`` per row, or
                ``(B, S)`` per token (packed rows: each token carries its
                record's type). Needed when ``lbc_beta > 0`` or
                ``router_supervision_coef > 0``.
            position_ids: ``(B, S)``; for packed rows they restart at 0 for every
                record, and the model's own attention masking (transformers builds
                a block-diagonal causal mask from them, or varlen flash attention
                uses them) keeps records from attending to each other.
            seq_ids: ``(B, S)`` packed rows: the record index of each token within
                its row (records of a row have distinct ids), -1 on padding. The
                LBC's Q is then a per-record sum.
            num_items_in_batch: Divide the summed LM loss by this (e.g. the
                labelled tokens of a whole optimizer step) instead of by this
                batch's labelled-token count (transformers' convention).
            **kwargs: Passed to the base model.

        Returns:
            :class:`LoRAMoEOutput`.
        """
        packed = seq_ids is not None
        if packed:
            if position_ids is None:
                raise ValueError("packed rows (seq_ids given) need position_ids")
            token_mask_BS = (seq_ids >= 0).long()
            base_mask = None  # the model masks by position_ids
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            token_mask_BS = attention_mask
            base_mask = attention_mask
        if labels is not None and task_type is None:
            for name in ("lbc_beta", "router_supervision_coef"):
                if getattr(self.cfg, name) > 0:
                    raise ValueError(
                        f"{name} > 0 needs the per-sample task_type (1 = world knowledge, "
                        f"0 = downstream) in the batch; set {name}=0 to train without it"
                    )
        attn = str(getattr(getattr(self.base, "config", None), "_attn_implementation", ""))
        if packed and attn.startswith("flash") and input_ids.shape[0] > 1:
            # transformers finds varlen boundaries in position_ids only for one row:
            # flatten (B, S) -> (1, B*S). A row's first label is -100 (a record's
            # first token, or padding), so no loss crosses a row boundary.
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
            labels = None if labels is None else labels.reshape(1, -1)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if labels is not None or packed:
            # No KV cache when training: it costs memory, and transformers only
            # derives the packed block-diagonal mask when there is none.
            kwargs.setdefault("use_cache", False)
        recorder = Recorder()
        layers = self.moe_layers()
        for layer in layers:
            layer.recorder = recorder
        try:
            if labels is None:
                logits = self.base(input_ids=input_ids, attention_mask=base_mask, **kwargs).logits
                logits = logits.reshape(*token_mask_BS.shape, -1)  # undo a varlen flattening
                lm_loss = lm_sum = None
                n_lab = 0
            else:
                logits = None
                lm_sum, n_lab = self._lm_loss_sum(input_ids, base_mask, labels, **kwargs)
                denom = n_lab if num_items_in_batch is None else num_items_in_batch
                if torch.is_tensor(denom):
                    denom = denom.to(lm_sum.device, torch.float32)
                lm_loss = lm_sum / denom if n_lab or num_items_in_batch is not None else lm_sum
        finally:
            for layer in layers:
                layer.recorder = None
        self._check_recorded_with_grad(recorder)
        for layer, routing in recorder.records.values():
            if routing.probs_TE.shape[0] != token_mask_BS.numel():
                raise ValueError(
                    f"{layer.name} routed {routing.probs_TE.shape[0]} tokens for a batch of "
                    f"{tuple(token_mask_BS.shape)} positions: {type(self.base).__name__} changes "
                    "the number of positions inside the model (e.g. prepends prompt tokens), "
                    "and the routing losses need one routed token per input position; "
                    "adapt linears that see the input positions only"
                )
        seg_T, n_rec, type_N = records_of_batch(token_mask_BS, seq_ids, task_type)
        aux = aux_losses(
            recorder, self.cfg, token_mask_BS.reshape(-1), seg_T, n_rec, type_N, self.aux_gather
        )
        loss = None
        if lm_loss is not None:
            loss = (
                lm_loss
                + self.cfg.lbc_beta * aux.lbc
                + self.cfg.router_supervision_coef * aux.supervision
                + self.cfg.load_balance_coef * aux.load_balance
                + self.cfg.z_loss_coef * aux.z
            )
        return LoRAMoEOutput(
            loss=loss,
            lm_loss=lm_loss,
            lm_loss_sum=lm_sum,
            lbc_loss=aux.lbc,
            router_supervision_loss=aux.supervision,
            load_balance_loss=aux.load_balance,
            z_loss=aux.z,
            logits=logits,
            num_label_tokens=n_lab,
        )

    def _lm_loss_sum(self, input_ids, attention_mask, labels, **kwargs):
        """Summed next-token cross-entropy (fp32) over labelled positions, and their count.

        The head runs through the model's own forward, so every architecture's
        logit scaling (Granite's ``logits_scaling``, Cohere's ``logit_scale``,
        Gemma's soft-capping, ...) is the model's own. A pre-forward hook on the
        output embedding hands it only the hidden states of labelled positions
        (``(1, L, D)`` instead of ``(B, S, D)``): the V-wide head is computed for
        those rows only, and everything after it in the model is element-wise.
        """
        target_BS = labels[:, 1:]
        keep_BS = target_BS != -100
        head = self.base.get_output_embeddings()

        def only_labelled(_module, args):
            h_BSD = args[0]
            return (h_BSD[:, :-1][keep_BS].unsqueeze(0),) + tuple(args[1:])

        handle = head.register_forward_pre_hook(only_labelled)
        try:
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        finally:
            handle.remove()
        logits_LV = logits.reshape(-1, logits.shape[-1]).float()
        n = int(keep_BS.sum())
        if logits_LV.shape[0] != n:
            raise RuntimeError(
                f"{type(self.base).__name__}: the output head returned {logits_LV.shape[0]} rows "
                f"for {n} labelled positions; this architecture post-processes logits by "
                "position and is not supported"
            )
        if n == 0:
            return logits_LV.sum() * 0.0, 0
        loss = F.cross_entropy(logits_LV, target_BS[keep_BS], reduction="sum")
        return loss, n

    def _check_recorded_with_grad(self, recorder: Recorder) -> None:
        """Refuse routing recorded without autograd while aux losses should train routers.

        Reentrant activation checkpointing runs the first forward under no-grad:
        the aux losses would then be constants and silently give routers no
        gradient. Non-reentrant checkpointing records routing with autograd.
        """
        if not (torch.is_grad_enabled() and self.training):
            return
        cfg = self.cfg
        if not (
            cfg.lbc_beta or cfg.router_supervision_coef or cfg.load_balance_coef or cfg.z_loss_coef
        ):
            return
        for layer, routing in recorder.records.values():
            if layer.router.weight.requires_grad and not routing.probs_TE.requires_grad:
                raise RuntimeError(
                    f"{layer.name}: routing was recorded without autograd, so the auxiliary "
                    "losses would give the routers no gradient. This happens under reentrant "
                    "activation checkpointing; use non-reentrant checkpointing "
                    '(gradient_checkpointing_kwargs={"use_reentrant": False}, what '
                    "train.activation_checkpointing does)"
                )
