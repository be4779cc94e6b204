"""Build random tiny transformers `Glm4MoeForCausalLM` models (the reference) and hand
their weights to glm-jax in hub layout."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from glm_jax import GlmConfig

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=24,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=512,
    tie_word_embeddings=False, num_nextn_predict_layers=1,
    rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
)


def hf_model(seed: int = 0, **overrides) -> transformers.Glm4MoeForCausalLM:
    """A float32 reference with eager attention and eager experts, every weight random
    (norms and correction bias included, so that a swapped tensor cannot hide)."""
    torch.manual_seed(seed)
    cfg = transformers.Glm4MoeConfig(**{**BASE, **overrides})
    model = transformers.Glm4MoeForCausalLM(cfg).float().eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "norm" in name else 0.08
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


def hub_state_dict(model: transformers.Glm4MoeForCausalLM) -> dict[str, np.ndarray]:
    """The main model's tensors in hub layout (per expert, [out, in]) as save_pretrained
    writes them."""
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        _hub_layout(name, t.detach().float().numpy(), out)
    return out


def glm_config(model: transformers.Glm4MoeForCausalLM, **compute) -> GlmConfig:
    return GlmConfig.from_hf(model.config.to_dict(), **compute)


def _hub_layout(name: str, t: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Write one module tensor into `out` under hub names: fused experts split per expert."""
    if name.endswith("mlp.experts.gate_up_proj"):
        prefix, half = name[: -len("gate_up_proj")], t.shape[1] // 2
        for e in range(t.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = t[e, :half].copy()
            out[f"{prefix}{e}.up_proj.weight"] = t[e, half:].copy()
    elif name.endswith("mlp.experts.down_proj"):
        prefix = name[: -len("down_proj")]
        for e in range(t.shape[0]):
            out[f"{prefix}{e}.down_proj.weight"] = t[e].copy()
    else:
        out[name] = t.copy()


def hf_mtp_model(main: transformers.Glm4MoeForCausalLM, seed: int = 0):
    """transformers' generic `MtpModel` on top of `main`, every weight random."""
    from transformers.modeling_layers import MtpModel

    mtp = MtpModel(main, main.config.num_nextn_predict_layers).float().eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            if name in ("embed_tokens.weight", "shared_head.weight"):
                continue  # tied to the main model
            scale, base = (0.5, 1.0) if "norm" in name else (0.08, 0.0)
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))
        for name, b in mtp.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return mtp


def mtp_hub_state_dict(mtp, num_hidden_layers: int) -> dict[str, np.ndarray]:
    """MtpModel tensors under the hub names GLM-4.5 uses (layer index num_hidden_layers + d),
    including the embedding / head copies that GLM-4.5 stores there."""
    out: dict[str, np.ndarray] = {}
    for name, t in mtp.state_dict().items():
        t = t.detach().float().numpy()
        if name.startswith("layers."):
            _, depth, rest = name.split(".", 2)
            prefix = f"model.layers.{num_hidden_layers + int(depth)}."
            rest = rest.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")
            _hub_layout(prefix + rest, t, out)
    for depth in range(len(mtp.layers)):
        prefix = f"model.layers.{num_hidden_layers + depth}."
        out[prefix + "embed_tokens.weight"] = mtp.embed_tokens.weight.detach().float().numpy().copy()
        out[prefix + "shared_head.head.weight"] = mtp.shared_head.weight.detach().float().numpy().copy()
    return out
