"""The Hugging Face model files. Importing this package registers them with the Auto classes, so
inside llamaforge our folders load without `trust_remote_code` prompts; `save_pretrained` writes
`auto_map` and copies the two files so that outside llamaforge `trust_remote_code=True` loads them."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_llamaforge import LlamaForgeConfig
from .modeling_llamaforge import LlamaForgeForCausalLM

AutoConfig.register("llamaforge", LlamaForgeConfig, exist_ok=True)
AutoModelForCausalLM.register(LlamaForgeConfig, LlamaForgeForCausalLM, exist_ok=True)
LlamaForgeConfig.register_for_auto_class()
LlamaForgeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LlamaForgeConfig", "LlamaForgeForCausalLM"]
