"""Reference models for jaxmx experiments, built only from stock Flax layers.

Linen and nnx variants share module names and parameter shapes, so a single
set of path-based substitution rules applies to both.
"""

from models.cnn import CNN as CNN
from models.cnn import CNNnnx as CNNnnx
from models.gpt import GPT as GPT
from models.gpt import GPTConfig as GPTConfig
from models.gpt_nnx import GPTnnx as GPTnnx
from models.gpt_nnx import linen_to_nnx_params as linen_to_nnx_params
from models.lenet import LeNet300100 as LeNet300100
from models.llama import KVCache as KVCache
from models.llama import Llama as Llama
from models.llama import LlamaConfig as LlamaConfig
from models.minilm import MiniLM as MiniLM
from models.minilm import MiniLMConfig as MiniLMConfig

__all__ = [
    "CNN",
    "GPT",
    "CNNnnx",
    "GPTConfig",
    "GPTnnx",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "MiniLM",
    "MiniLMConfig",
    "linen_to_nnx_params",
]
