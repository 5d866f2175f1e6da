"""leanvlm: vision-language models whose language decoder spends little compute on vision tokens."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from leanvlm.config import IMAGE_TOKEN, LeanVLMConfig
from leanvlm.decoders import DECODERS, ImageContext, KVCache
from leanvlm.generation import SamplingParams, generate_steps
from leanvlm.modeling import LeanVLMForConditionalGeneration, LeanVLMOutput
from leanvlm.processing import LeanVLMProcessor

__version__ = "0.1.0"

AutoConfig.register(LeanVLMConfig.model_type, LeanVLMConfig, exist_ok=True)
# After `import leanvlm`, transformers' Auto classes resolve a saved leanvlm directory (no trust_remote_code): the
# model as an image-text-to-text model and, for code that asks for a causal LM, as one too.
AutoModelForImageTextToText.register(LeanVLMConfig, LeanVLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LeanVLMConfig, LeanVLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LeanVLMConfig, LeanVLMProcessor, exist_ok=True)

__all__ = [
    "DECODERS",
    "IMAGE_TOKEN",
    "ImageContext",
    "KVCache",
    "LeanVLMConfig",
    "LeanVLMForConditionalGeneration",
    "LeanVLMOutput",
    "LeanVLMProcessor",
    "SamplingParams",
    "__version__",
    "generate_steps",
]
