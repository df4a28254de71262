"""sd3fit: fine-tune Stable Diffusion 3 Medium on one small GPU, as a plugin for SimpleTuner."""

__version__ = "0.1.0"
