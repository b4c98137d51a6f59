"""RECAST at the edge: compact task files, one ONNX graph for every task, the device-side runner.

- :mod:`recast.edge.pack`: packed (fp16 / int8) task files, read back and measured for accuracy.
- :mod:`recast.edge.graph`: the task-generic network whose task comes in as inputs.
- :mod:`recast.edge.export`: writing an ONNX directory (graph, task files, manifest with checksums).
- :mod:`recast.edge.device`: the device side, numpy + ONNX Runtime only (no torch).
- :mod:`recast.edge.bench`: latency, task switch, bytes and packed accuracy in one run.
"""
