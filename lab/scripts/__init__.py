"""The lab's one-off scripts: studies and repairs that made a committed result and use the lab (lab.export, lab.bench,
the runner, its spec and report). Run each from the repository root as `python -m lab.scripts.NAME` (`--help` says
what it takes); the result each made is named in RESULTS.md. Scripts that need only the library and the paper's
scripts live in scripts/ at the top.

- int8_choice, int8_layers, int8_first_layer, int8_recipe_speed: how the first int8 recipe (unfused-l0fp32) was
  chosen on the AVX2 CPU (results/export/int8_*.log); int8_recipes, int8_profile, int8_quality: the recipes of
  sbmoe.onnx.INT8_RECIPES side by side, where the int8 graph spends its time, and their retrieval quality against fp32.
- openvino_choice: OpenVINO against onnxruntime for the exported encoder (results/export/openvino_choice.*).
- transfer_demo: the runner's transfer report end to end on tiny folders (results/transfer-demo/).
- epochs_5_cpu.sh: the 5-epoch baseline on the CPU in fp32 against Table 1's (results/ablations/epochs-5-cpu/).
- backfill_provenance: provenance.json for the cells committed before cells recorded it.
- routing_before_after: random-routing cells before and after the integer routing keys
  (results/sbmoe-frozen/logs/random-routing-before-after.md).
"""
