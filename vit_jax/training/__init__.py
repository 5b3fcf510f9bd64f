"""Training and evaluation: the optimizer, the mesh and shardings, the jitted steps, the metrics,
and the loop."""
