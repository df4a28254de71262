"""Images from the base model, LoRA adapters and full fine-tunes, side by side (`sd3fit infer`, `inference/*.py`)."""
