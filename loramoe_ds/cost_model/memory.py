"""Predicted memory of one rank by item: parameters, gradients, optimizer state, activations."""

from __future__ import annotations

from collections.abc import Sequence

from loramoe_ds.cost_model.workload import LinearShape, ModelShapes, Workload, pad
from loramoe_ds.cost_model.zero3 import zero3_live_peak


def memory(
    shapes: ModelShapes, w: Workload, sharded: Sequence[LinearShape], rep: Sequence[LinearShape]
) -> dict[str, float]:
    """Per-rank memory items in bytes.

    * ``base``: the frozen base, ``b`` bytes per element, ``1/W`` under ZeRO-3.
    * ``adapter``: routers and replicated banks (engine, ``b``; ``1/W`` under
      ZeRO-3) and the local EP shards (fp32).
    * ``grads``: engine gradients (fp32 partition, ``1/W`` under ZeRO >= 2) and
      the local shards' fp32 gradients.
    * ``optimizer``: AdamW state: fp32 master + two moments (12 B) of the engine
      parameters (``1/W`` under ZeRO >= 1), two moments (8 B) of the local shards.
    * ``zero_buffers``: ZeRO's gradient bucket (``reduce_bucket_size`` elements
      of ``b`` bytes, allocated whole by stages 2 and 3) and, under ZeRO-3, the
      most elements held gathered at once, ``b`` bytes each
      (:func:`~loramoe_ds.cost_model.zero3.zero3_live_peak`): the gathered
      parameters (up to ``stage3_max_live_parameters`` and the prefetch that
      crosses it), the flat buffer of a multi-parameter gather until its last
      parameter is fetched (its parameters are copied out of it: held twice),
      and, on gloo, the temporary copy of the all-gather that is running (the
      output held twice while it runs).
    * ``activations_no_ckpt`` / ``activations_ckpt``: one micro-batch's saved
      activations without / with activation checkpointing (:func:`activations`).
    """
    W, P, b = w.world, w.ep_size, w.param_bytes
    z = w.zero_stage
    n_train = sum(lin.router_params for lin in shapes.linears) + sum(lin.bank_params for lin in rep)
    n_local = sum(lin.bank_params // P for lin in sharded)
    shard3 = W if (z == 3 and W > 1) else 1
    part_opt = W if z >= 1 else 1
    part_grad = W if z >= 2 else 1
    mem = {
        "base": sum(pad(n, shard3) for n in shapes.base_params) / shard3 * b,
        "adapter": n_train / shard3 * b + n_local * 4,
        "grads": n_train / part_grad * 4 + n_local * 4,
        "optimizer": n_train / part_opt * 12 + n_local * 8,
    }
    buffers = 0.0
    if z >= 2:  # ZeRO-2's contiguous-gradient bucket, ZeRO-3's reduce bucket: full size
        buffers += w.reduce_bucket * b
    if z == 3 and W > 1:
        buffers += zero3_live_peak(shapes, w) * b
    mem["zero_buffers"] = buffers
    no_ckpt, ckpt = activations(shapes, w, sharded)
    mem["activations_no_ckpt"], mem["activations_ckpt"] = no_ckpt, ckpt
    return mem


def activations(
    shapes: ModelShapes, w: Workload, sharded: Sequence[LinearShape] = ()
) -> tuple[float, float]:
    """Saved activations of one micro-batch, bytes: (without, with) activation checkpointing.

    Per decoder layer and token (elements of ``a`` bytes; HF Llama with SDPA
    attention; h hidden, I intermediate, kv = kv_heads * head_dim):

    * attention block: the RMSNorm's input and output (2h), q after RoPE, k, v
      (h + 2kv), the attention output (h), o_proj's input is that output; the
      residual (h): ``5h + 2kv``;
    * MLP block: RMSNorm (2h), gate and up outputs, SiLU output, down input
      (4I): ``2h + 4I``;
    * in bf16 the RMSNorms also keep an fp32 copy of their input (2 x 2h);
    * each adapted linear: the router's fp32 logits and probabilities
      (2 slots x 4 bytes), the rank-space activations before and after gating
      (2 E R), the mixture output (O), the dropped-out input when dropout is on
      (D); a sharded soft linear also keeps the rows it received (P (D + L):
      the bank's input and gates), a sharded top-k one the received rows and
      the returned rows the gates multiply (K (D + O)) and its rank-space rows
      (2 K R) instead of 2 E R.

    Plus the LM head at labelled positions (logits and their fp32 softmax:
    ``2 V`` per labelled token, 4 bytes). With checkpointing only each layer's
    input (h per token) is kept, plus one layer's full set during its recompute.
    """
    T, a = w.tokens, w.act_bytes
    h, inter = shapes.hidden, shapes.intermediate
    kv = shapes.kv_heads * shapes.head_dim
    base_layer = (5 * h + 2 * kv) + (2 * h + 4 * inter) + (4 * h if a < 4 else 0)
    per_layer = [base_layer * T * a for _ in range(shapes.num_layers)]
    sharded_ids = {id(lin) for lin in sharded}
    for lin in shapes.linears:
        el = 2 * lin.experts * lin.rank + lin.d_out + (lin.d_in if w.dropout else 0)
        if id(lin) in sharded_ids:
            P = w.ep_size
            if w.router == "soft":
                el += P * (lin.d_in + lin.experts // P)
            else:
                el += w.top_k * (lin.d_in + lin.d_out) + 2 * w.top_k * lin.rank
                el -= 2 * lin.experts * lin.rank
        per_layer[lin.layer] += T * (el * a + 2 * lin.slots * 4)
    head = w.label_tokens * shapes.vocab * 4 * 2
    no_ckpt = sum(per_layer) + head
    ckpt = shapes.num_layers * T * h * a + max(per_layer, default=0) + head
    return float(no_ckpt), float(ckpt)
