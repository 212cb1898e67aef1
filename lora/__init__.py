"""LoRA and adapter training on accelerate + peft."""
