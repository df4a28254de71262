"""`sd3fit bench`: train each preset for a few steps on a synthetic dataset and record time and memory per preset.

`runner` runs the presets (each through `sd3fit train`'s own code, in its own process), `rows` turns a finished
run folder into one results row and `results` keeps them in files, `flops` counts the model FLOPs behind the utilisation figure, `budget` reads
memory caps such as `24GB`; `sd3fit.host` describes the GPU and versions.
"""
