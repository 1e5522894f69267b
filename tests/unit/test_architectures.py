"""The LM loss on every causal-LM architecture of the installed transformers.

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that builds from a tiny
config and has ``nn.Linear`` layers in its decoder, LoRA experts are injected
with random (non-zero) ``A`` and ``B`` and ``LoRAMoEModel(...).lm_loss`` is
compared with the loss the injected model computes itself (``labels=`` ->
``.loss``, transformers' shifted mean cross-entropy). This covers every logit
post-processing an architecture has (Granite's ``logits_scaling``, Cohere's
``logit_scale``, Gemma's soft-capping, ...), because the reference is the
model's own code. Architectures whose layers are not ``nn.Linear`` must be refused.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loramoe_ds import AdapterConfig, inject

_LAYER_RE = re.compile(r"\.(\d+)\.")
MAX_PARAMS = 5_000_000
B, S, V = 2, 8, 128

# Size attributes shrunk wherever a config (or its text_config) has them.
_SIZES = {
    "hidden_size": 32,
    "n_embd": 32,
    "d_model": 32,
    "intermediate_size": 64,
    "n_inner": 64,
    "ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "decoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rotary_dim": 4,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "vocab_size": V,
    "vocab_size_per_layer_input": V,
    "hidden_size_per_layer_input": 8,
    "max_position_embeddings": 64,
    "n_positions": 64,
}
# Logit post-processing made strong enough to change the loss of a tiny random model.
_LOGIT_SCALING = {"logits_scaling": 8.0, "logit_scale": 0.25, "final_logit_softcapping": 0.5}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def _get(cfg, name):
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 - e.g. per-layer attributes that refuse a global read
        return None


def _settable(cfg, name) -> bool:
    return not isinstance(getattr(type(cfg), name, None), property)


def _tiny_kwargs(cfg) -> dict:
    """Shrunk values for the size attributes ``cfg`` has (settable ones only)."""
    out = {}
    for k, v in _SIZES.items():
        if isinstance(_get(cfg, k), int) and _get(cfg, k) > 0 and _settable(cfg, k):
            out[k] = v
    for k, v in _LOGIT_SCALING.items():
        if isinstance(_get(cfg, k), (int, float)) and _settable(cfg, k):
            out[k] = v
    for k in _TOKEN_IDS:
        if isinstance(_get(cfg, k), int) and _get(cfg, k) >= V:
            out[k] = V - 1
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # MLA: no grouped KV heads
        out["num_key_value_heads"] = out["num_attention_heads"]
    if _get(cfg, "is_decoder") is False:  # BERT-likes: a causal LM is their decoder mode
        out["is_decoder"] = True
    n_layers = _get(cfg, "num_hidden_layers")
    for k, v in vars(cfg).items():
        if isinstance(v, list) and n_layers and len(v) == n_layers:  # per-layer lists
            out[k] = v[:2]
    return out


def tiny_config(model_type: str):
    """The config class's defaults with every size attribute that exists shrunk."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs = _tiny_kwargs(default)
    text = _get(default, "text_config")
    if text is not None and hasattr(text, "to_dict"):
        kwargs["text_config"] = {**text.to_dict(), **_tiny_kwargs(text)}
    return cls(**kwargs)


def build(model_type: str, class_name: str):
    """A tiny randomly initialised model, in eval mode."""
    import transformers

    cfg = tiny_config(model_type)
    cls = getattr(transformers, class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: some defaults are huge
            n = sum(p.numel() for p in cls(cfg).parameters())
        if n > MAX_PARAMS:
            raise _TooBigError(f"{n / 1e6:.1f}M params")
        torch.manual_seed(0)
        model = cls(cfg)
    return model.eval()


class _TooBigError(Exception):
    pass


def _is_linear_map(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward computes ``x W^T + b`` (subclasses are probed)."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward:
        return True
    x = torch.randn(2, module.in_features, dtype=module.weight.dtype)
    try:
        with torch.no_grad():
            y = module(x)
        return torch.is_tensor(y) and torch.allclose(y, F.linear(x, module.weight, module.bias))
    except Exception:  # noqa: BLE001 - anything that is not a plain linear map
        return False


def choose_targets(model: nn.Module) -> list[str]:
    """Suffixes of plain ``nn.Linear`` names in decoder layer 0 that name only layer linears.

    Left out: names that also belong to something else (another module type, a
    parameter, a linear outside layers 0-1); ``nn.Linear`` subclasses whose forward
    is not ``x W^T + b`` (MoE routers such as ``Llama4Router`` return tuples; Falcon's
    ``FalconLinear`` is kept); linears whose
    ``.weight`` the modeling code reads directly (Mamba's ``dt_proj``), bypassing
    their forward and so any adapter.
    """
    source = inspect.getsource(inspect.getmodule(type(model)))
    layer0, bad = set(), set()
    for name, module in model.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        m = _LAYER_RE.search(f".{name}.")
        plain = _is_linear_map(module)
        if plain and m and int(m.group(1)) == 0:
            layer0.add(suffix)
        if not plain or m is None or int(m.group(1)) >= 2:
            bad.add(suffix)
    for name, _ in model.named_parameters():
        bad.add(name.rsplit(".", 1)[-1])
    bad |= {s for s in layer0 if re.search(rf"\b{re.escape(s)}\.weight\b", source)}
    return sorted(layer0 - bad)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, -2:] = 0  # right padding on row 0
    labels = ids.clone()
    labels[:, :2] = -100  # prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def _shift_left(labels_BS: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = labels[:, t + 1]``: next-token targets for a loss that does not shift."""
    return torch.cat([labels_BS[:, 1:], torch.full_like(labels_BS[:, :1], -100)], 1)


# Their own ``labels=`` loss is a plain cross-entropy of logits[t] against labels[t]
# (no shift): these ``*ForCausalLM`` classes are decoders of encoder-decoder or
# masked-LM families whose callers pass labels already shifted. Their reference is
# therefore the own loss on ``labels`` shifted left by one, which is the shifted loss.
UNSHIFTED_OWN_LOSS = {
    "bart": "BartForCausalLM",
    "bigbird_pegasus": "BigBirdPegasusForCausalLM",
    "blenderbot": "BlenderbotForCausalLM",
    "blenderbot-small": "BlenderbotSmallForCausalLM",
    "marian": "MarianForCausalLM",
    "mbart": "MBartForCausalLM",
    "mvp": "MvpForCausalLM",
    "pegasus": "PegasusForCausalLM",
    "plbart": "PLBartForCausalLM",
    "trocr": "TrOCRForCausalLM",
    "whisper": "WhisperForCausalLM",
    "xlm": "XLMWithLMHeadModel",
    "xlnet": "XLNetLMHeadModel",
}
# Refused with a ValueError by design: the model changes the number of positions
# inside itself, so routed tokens no longer correspond to the batch's positions.
REFUSED = {"cpmant": "prepends prompt tokens inside CpmAntModel.forward"}
# Architectures with logit post-processing after the LM head; they must pass.
LOGIT_SCALED = ("granite", "cohere", "gemma2", "cohere2", "granitemoe", "vaultgemma")
# Measured with transformers 5.23.0: 146 of 189 pass (13 of them unshifted), 1 refused, 42 skip.
PASS_FLOOR = 135


def check(model_type: str, class_name: str) -> tuple[str, str, bool]:
    """``(status, detail, postprocessed)`` for one architecture.

    status: ``"pass"``, ``"refused"`` (ValueError from loramoe-ds), ``"skip"``
    (the tiny model does not build, is too big, has no adaptable linear, or its
    own forward fails) or ``"fail"``. ``postprocessed``: the model's logits differ
    from its LM head's output (logit scaling or soft-capping after the head).
    """
    try:
        base = build(model_type, class_name)
    except _TooBigError as e:
        return "skip", str(e), False
    except Exception as e:  # noqa: BLE001 - every build failure is a counted skip
        return "skip", f"build: {type(e).__name__}: {str(e)[:120]}", False
    targets = choose_targets(base)
    if not targets:
        return "skip", "no plain nn.Linear in decoder layer 0", False
    try:
        model = inject(base, AdapterConfig(target_modules=targets, dropout=0.0, lbc_beta=0.0))
    except Exception as e:  # noqa: BLE001
        return "fail", f"inject {targets}: {type(e).__name__}: {e}", False
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: the experts change the output
        for p in model.adapter_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids, mask, labels = batch()
    ref_labels = _shift_left(labels) if model_type in UNSHIFTED_OWN_LOSS else labels
    raw = []
    hook = base.get_output_embeddings().register_forward_hook(lambda m, a, out: raw.append(out))
    try:
        with torch.no_grad():
            ref = base(input_ids=ids, attention_mask=mask, labels=ref_labels, use_cache=False)
    except Exception as e:  # noqa: BLE001
        return "skip", f"own forward: {type(e).__name__}: {str(e)[:120]}", False
    finally:
        hook.remove()
    if getattr(ref, "loss", None) is None:
        return "skip", "own forward returns no loss", False
    logits = getattr(ref, "logits", None)
    postprocessed = (
        bool(raw)
        and torch.is_tensor(logits)
        and raw[0].shape == logits.shape
        and not torch.allclose(raw[0], logits, rtol=1e-3, atol=1e-4)
    )
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
    except ValueError as e:
        return "refused", str(e), postprocessed
    except Exception as e:  # noqa: BLE001
        return "fail", f"{targets}: {type(e).__name__}: {e}", postprocessed
    if not torch.allclose(out.lm_loss, ref.loss.float(), rtol=1e-5, atol=0):
        return "fail", f"{targets}: lm_loss {out.lm_loss:.6f} != own {ref.loss:.6f}", postprocessed
    return "pass", ",".join(targets), postprocessed


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[str, str, bool]]:
    """Every causal-LM architecture's result, computed once per test run."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = {mt: check(mt, cn) for mt, cn in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    print(summary(out))
    return out


def summary(res) -> str:
    lines = [f"{status}: {sum(s == status for s, _, _ in res.values())}" for status in _STATUSES]
    for mt, (status, detail, post) in sorted(res.items()):
        lines.append(f"  {status:7s} {mt}{' (post-processed logits)' if post else ''}: {detail}")
    return "\n".join(lines)


_STATUSES = ("pass", "refused", "skip", "fail")


def test_lm_loss_equals_the_models_own_loss_on_every_architecture(results):
    fails = {mt: d for mt, (s, d, _) in results.items() if s == "fail"}
    assert not fails, "\n".join(f"{mt}: {d}" for mt, d in fails.items())
    refused = {mt for mt, (s, _, _) in results.items() if s == "refused"}
    assert refused == set(REFUSED) & set(results), summary(results)
    for mt in REFUSED:
        if mt in results:
            assert "positions" in results[mt][1], results[mt][1]


def test_architectures_with_logit_scaling_pass(results):
    """Granite (logits_scaling), Cohere (logit_scale), Gemma 2 (soft-capping) and kin.

    ``postprocessed`` proves the tiny config's scaling really changes the logits,
    so equality is not reached by ignoring it.
    """
    present = [mt for mt in LOGIT_SCALED if mt in results]
    assert {"granite", "cohere", "gemma2"} <= set(present)
    for mt in present:
        status, detail, postprocessed = results[mt]
        assert status == "pass", f"{mt}: {status} {detail}"
        assert postprocessed, f"{mt}: its logits equal the raw head output; config too weak"


def test_many_architectures_pass(results):
    passing = [mt for mt, (s, _, _) in results.items() if s == "pass"]
    assert len(passing) >= PASS_FLOOR, summary(results)
    assert set(UNSHIFTED_OWN_LOSS) <= set(passing), summary(results)


def test_gpt2_conv1d_is_refused():
    base = build("gpt2", "GPT2LMHeadModel")
    with pytest.raises(ValueError, match=r"not nn\.Linear.*Conv1D|Conv1D.*not nn\.Linear"):
        inject(base, AdapterConfig(target_modules=("c_attn", "c_fc", "c_proj")))


def test_qwen3_moe_expert_parameters_are_refused():
    """Layer 0 dense (``mlp_only_layers=[0]``: nn.Linear), layer 1 with 3-D expert weights."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(**_tiny_kwargs(transformers.Qwen3MoeConfig()))
    cfg.mlp_only_layers = [0]
    base = transformers.Qwen3MoeForCausalLM(cfg)
    assert isinstance(base.model.layers[0].mlp.down_proj, nn.Linear)
    with pytest.raises(ValueError, match=r"3-D parameter.*nn\.Linear"):
        inject(base, AdapterConfig(target_modules=("gate_proj", "up_proj", "down_proj")))


def main():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    t = time.time()
    res = {mt: check(mt, cn) for mt, cn in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    print(summary(res))
    print(f"{time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
