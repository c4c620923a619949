"""Files from other tools: ONNX name scopes (:mod:`.onnx`), engine outputs (:mod:`.engine_outputs`).

Each submodule imports its heavy optional dependency lazily and alone: ``onnx`` only in
:mod:`torchprobe.io.onnx`, ``polygraphy`` only in :mod:`torchprobe.io.engine_outputs`.
"""
