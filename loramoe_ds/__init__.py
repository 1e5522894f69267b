"""loramoe-ds: mixtures of LoRA experts (LoRAMoE, MoLA) on DeepSpeed."""

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.adapter_io import load_adapter, save_adapter
from loramoe_ds.model.inject import inject
from loramoe_ds.model.lm import LoRAMoEModel, LoRAMoEOutput

__all__ = [
    "AdapterConfig",
    "LoRAMoEModel",
    "LoRAMoEOutput",
    "inject",
    "load_adapter",
    "save_adapter",
]
__version__ = "0.1.0"
