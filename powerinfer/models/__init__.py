"""Model architectures, one file each; `ARCHITECTURES` maps a config's `model_type` to its module."""

from powerinfer.errors import UnsupportedModelError
from powerinfer.models import llama

ARCHITECTURES = {"llama": llama, "mistral": llama, "qwen2": llama}


def architecture(model_type: str):
    """The module implementing `model_type` (it defines `ModelArgs` and `Model`)."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} (supported: {', '.join(ARCHITECTURES)})") from None
