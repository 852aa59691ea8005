"""Built-in models and the ``--model`` resolver."""
from .registry import canonical_spec, is_builtin, load_model, ModelSpecError

__all__ = ["load_model", "ModelSpecError", "canonical_spec", "is_builtin"]
