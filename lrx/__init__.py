"""lrx: distributed LoRA-family fine-tuning (SRLoRA, EigenLoRAx, LoRA, PiSSA)."""

__version__ = "0.1.0"
