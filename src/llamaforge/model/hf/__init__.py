"""The Hugging Face model files. Importing this package registers our model class for our config
class with AutoModelForCausalLM (inside llamaforge); `save_pretrained` writes `auto_map` and copies the
two files so that outside llamaforge `trust_remote_code=True` loads them. The config's `model_type` is
"llama" (the folder is a stock Llama folder too), so it is not registered as a model type of its own."""

from transformers import AutoModelForCausalLM

from .configuration_llamaforge import LlamaForgeConfig
from .modeling_llamaforge import LlamaForgeForCausalLM

AutoModelForCausalLM.register(LlamaForgeConfig, LlamaForgeForCausalLM, exist_ok=True)
LlamaForgeConfig.register_for_auto_class()
LlamaForgeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LlamaForgeConfig", "LlamaForgeForCausalLM"]
