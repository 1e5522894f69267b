"""loramoe-ds: mixtures of LoRA experts (LoRAMoE, MoLA) on DeepSpeed."""

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.inject import LoRAMoEModel, LoRAMoEOutput, inject, load_adapter

__all__ = ["AdapterConfig", "LoRAMoEModel", "LoRAMoEOutput", "inject", "load_adapter"]
__version__ = "0.1.0"
