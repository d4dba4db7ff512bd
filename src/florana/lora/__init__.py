"""LoRA adapters in memory and on disk (PEFT's directory format)."""

from florana.lora.adapter import LoraAdapter, LoraModule, module_scaling
from florana.lora.peft_io import load_adapter, save_adapter, save_base_update

__all__ = ["LoraAdapter", "LoraModule", "module_scaling", "load_adapter", "save_adapter", "save_base_update"]
