"""glm-jax: GLM-4.5 (glm4_moe) in JAX / Flax NNX."""

from glm_jax.config import GlmConfig
from glm_jax.generate import generate
from glm_jax.hf_io import from_hf_state_dict, to_hf_state_dict
from glm_jax.model.transformer import CausalLMOutput, GlmForCausalLM

__all__ = ["GlmConfig", "GlmForCausalLM", "CausalLMOutput", "from_hf_state_dict", "generate",
           "to_hf_state_dict"]
