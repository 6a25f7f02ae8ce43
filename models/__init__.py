"""LLaMA models and their Hugging Face import/export."""

from models.hf import load_hf, save_hf
from models.llama import Llama, ModelConfig, loss_fn

__all__ = ["Llama", "ModelConfig", "loss_fn", "load_hf", "save_hf"]
