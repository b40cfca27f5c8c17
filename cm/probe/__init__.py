"""Capacity probes: how much of a trained U-Net's capacity each class relies on, and which classes steer it.

Two measurements from Capacity Manipulation (Hong et al., ICLR 2026):

* Pruning probe (the paper's Fig. 1b; `pruning`). Zero the smallest-magnitude weights and compare
  every class's eps-prediction loss before and after: tail classes, which the majority-dominated
  training leaves with little dedicated capacity, lose the most. `theta_g` runs the same comparison
  for a CM model with its reserved low-rank branches off (theta_g only, the model of Table 7), which
  shows how much each class leans on the reserved capacity.
* Gradient dominance (Thm. 2.1 measured; `dominance`). For each parameter matrix, whether the
  full-batch gradient points more along the majority (many) classes' gradient or along the minority
  (few) classes' one; reported per tensor and as the share of majority-dominated matrices per U-Net
  block and, for CM models, per part (W_g vs the branch factors B, A).

Everything but `io` (the probe stage: a checkpoint and its training set in) is a pure function of a
network, images in the model's range and seeds; results are plain JSON-able dicts (lists in
class-index order). `scoring` holds what the probes share: the input checks and the per-class losses
on seeded draws, identical for two networks compared (a paired comparison).
"""

from cm.probe.dominance import BLOCKS, gradient_dominance, noised_probe_batches, parameter_matrices
from cm.probe.io import as_model_inputs, probe_model
from cm.probe.pruning import SCOPES, PruneInfo, prunable_weights, prune_smallest, pruning_probe
from cm.probe.scoring import NOISE_BLOCK, compare_class_losses, model_num_classes, per_image_losses
from cm.probe.theta_g import theta_g_probe

__all__ = ["BLOCKS", "NOISE_BLOCK", "SCOPES", "PruneInfo", "as_model_inputs", "compare_class_losses",
           "gradient_dominance", "model_num_classes", "noised_probe_batches", "parameter_matrices",
           "per_image_losses", "probe_model", "prunable_weights", "prune_smallest", "pruning_probe",
           "theta_g_probe"]
