"""Optimizers: Muon for weight matrices (per expert), AdamW for the rest."""

from glm_jax.optim.labels import TABLE, MatrixDims, decay_mask, matrix_dims, param_labels, rule_for
from glm_jax.optim.muon import (MuonState, muon, newton_schulz, orthogonalize, param_shardings,
                                scale_by_muon)

__all__ = ["TABLE", "MatrixDims", "MuonState", "decay_mask", "matrix_dims", "param_labels", "muon",
           "newton_schulz", "orthogonalize", "param_shardings", "rule_for", "scale_by_muon"]
