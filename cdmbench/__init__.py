"""cdmbench: a benchmark and evaluation harness for few-step diffusion distillation."""

__version__ = "0.3.0"
