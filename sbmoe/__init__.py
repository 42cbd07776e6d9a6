"""The library beneath the paper's scripts: data and splits, metrics, encoding, exact search, retrieval and fusion,
negatives, the loss, the trainer, the MoE layers, result files and provenance. It never imports the scripts above it
(model.py, train.py, eval.py, utils.py) nor the lab.
"""
