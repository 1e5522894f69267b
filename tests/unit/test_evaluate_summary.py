"""The demo's closing summary (launcher/evaluate.py --compare)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "evaluate_cli", Path(__file__).resolve().parents[2] / "launcher" / "evaluate.py"
)
ev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def result(ll, gen, macro, util=None, adapter_config=None):
    r = {
        "model": "m",
        "knowledge": {
            "n": 10,
            "generation": {"accuracy": gen},
            "loglik": {"accuracy": ll, "accuracy_per_token": ll, "mean_answer_loglik": -1.0},
        },
        "downstream": {"n": 5, "macro_accuracy": macro, "per_task": {"t": {"accuracy": macro}}},
    }
    if util:
        r["utilisation"] = util
        r["adapter_config"] = adapter_config
    return r


def test_compare_puts_the_format_robust_score_first_and_says_where_inputs_went():
    util = {"knowledge_share": {"knowledge": [0.6, 0.52, 0.49], "downstream": [0.4, 0.5, 0.5]}}
    out = ev.compare(
        result(0.8, 0.9, 0.1),
        result(0.6, 0.3, 0.7, util, {"lbc_variant": "intended", "lbc_beta": 0.5}),
    ).splitlines()
    assert out[1].startswith("knowledge loglik-rank acc") and "0.75x" in out[1]
    assert out[2].startswith("knowledge generation acc")
    routing = [line for line in out if "routing" in line][0]
    assert "lbc_variant=intended" in routing
    assert "knowledge inputs 0.537, downstream inputs 0.467" in routing  # means of the lists
    assert "in 2 of 3 layers" in "\n".join(out)


def test_compare_states_the_three_promises_with_their_goals():
    util = {"knowledge_share": {"knowledge": [0.9, 0.8, 0.3], "downstream": [0.1, 0.2, 0.5]}}
    cfg = {"null_experts": 2, "router_supervision_coef": 1.0, "lbc_variant": "intended"}
    kept = ev.compare(result(0.8, 0.8, 0.1), result(0.8, 0.77, 0.75, util, cfg))
    assert "null_experts=2, router_supervision_coef=1.0" in kept
    assert "0.96x of the base (goal >= 0.95x): met" in kept
    assert "(goal >= 73.2%, 0.95x of LoRAMoE + LBC's 77.1% on this demo): met" in kept
    assert "in 2 of 3 layers (goal: most layers): met" in kept
    lost = ev.compare(result(0.8, 0.8, 0.1), result(0.8, 0.4, 0.7, util, cfg))
    assert "0.50x of the base (goal >= 0.95x): NOT met" in lost
    assert "on this demo): NOT met" in lost
