"""The LLM Efficiency Cookbook's helper package: model loading, evaluation, measurement,
and the from-scratch implementations the notebooks build on. One module per technique family."""

from .data import calibration_batch, encode, load_text
from .errors import CookbookError, GPURequiredError, MissingDependencyError, ModelLoadError
from .evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity, perplexities
from .measure import (
    PeakMemory,
    count_parameters,
    measure_generation,
    model_bytes,
    time_function,
)
from .models import generate_text, load_model, resolve_device, set_seed
from .report import ResultsTable, show_results

__version__ = "0.1.0"

__all__ = [
    "CookbookError", "DEFAULT_PROTOCOL", "GPURequiredError", "MissingDependencyError", "ModelLoadError",
    "PeakMemory", "PerplexityProtocol", "ResultsTable", "calibration_batch", "count_parameters", "encode",
    "generate_text", "load_model", "load_text", "measure_generation", "model_bytes", "perplexities",
    "perplexity", "resolve_device", "set_seed", "show_results", "time_function",
]
