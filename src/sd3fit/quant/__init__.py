"""Quantized layers for a frozen base model: torch only, no SimpleTuner (the glue is in sd3fit.simpletuner)."""
