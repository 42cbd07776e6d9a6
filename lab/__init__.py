"""The lab: the experiment runner, its spec and report, statistics, the frozen study, export and benchmarks.

Run each as `python -m lab.NAME` or through its entry point at the top (experiment.py, export.py, bench.py,
compare.py, frozen.py). Nothing in model.py, train.py, eval.py, utils.py or sbmoe/ imports from here.
"""
