"""GLM-4.5-Air (106B total, 12B active), as zai-org/GLM-4.5-Air's config.json: GLM-4.5's
architecture (configs/glm4_5.py) with the fields below changed: narrower, 46 layers
instead of 92 (one dense instead of three), 128 routed experts instead of 160, routed
scaling 1.0 instead of 2.5, and no QK norm."""

import ml_collections

from configs import glm4_5


def get_config() -> ml_collections.ConfigDict:
    config = glm4_5.get_config()
    config.model.update(dict(
        hidden_size=4096,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=46,
        n_routed_experts=128,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
    ))
    return config
