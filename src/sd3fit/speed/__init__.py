"""Torch-only pieces of sd3fit's speed patches; the SimpleTuner glue lives in `sd3fit.simpletuner.patches`."""
