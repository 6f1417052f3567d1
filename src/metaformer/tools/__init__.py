"""Tools on top of the models and tasks: export, Grad-CAM, complexity counts, benchmarks, the ablation grid,
hub folders, layout conversion."""
