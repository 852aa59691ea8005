"""Built-in models and the ``--model`` resolver."""
from .registry import load_model, ModelSpecError

__all__ = ["load_model", "ModelSpecError"]
