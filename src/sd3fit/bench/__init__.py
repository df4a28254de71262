"""`sd3fit bench`: train each preset for a few steps on a synthetic dataset and record time and memory per preset.

`runner` runs the presets (each through `sd3fit train`'s own code, in its own process), `rows` turns a finished
run folder into one results row, `flops` counts the model FLOPs behind the utilisation figure, `machine`
describes the GPU and versions, `budget` reads memory caps such as `24GB`.
"""
