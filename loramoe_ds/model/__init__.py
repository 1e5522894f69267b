"""Single-device model math: routers, fused experts, losses, injection. No DeepSpeed."""
