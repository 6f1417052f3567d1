"""The tasks: image classification (training, evaluation, prediction) and dense prediction (detection,
segmentation)."""
