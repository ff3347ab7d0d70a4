"""Simulated FP4/MX low-precision training: fake-quant formats, rotations, quantized GEMMs."""
from parcae.quant.formats import FORMATS
from parcae.quant.quantize import quantize_dequantize
from parcae.quant.dense import RECIPES, qdot, quant_spec, validate_recipe
