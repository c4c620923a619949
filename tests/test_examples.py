import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_detector_example_runs_the_whole_path(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "detector_fp16.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert re.search(r"strict-onnx:fp16 +DIVERGES", out)
    assert "top culprit: encoder.layers.1.norm2 [strict-onnx:fp16] overflow" in out
    assert "VERIFIED" in out and "keep in FP32: encoder.layers.1.norm2" in out
    for line in out.splitlines():
        if line.startswith(("eager fp16 with the fix", "inductor fp16 with the fix")):
            assert float(line.rsplit(" ", 1)[1]) < 1e-2, line
    assert "torch_tensorrt.dynamo.compile" in out
    assert (tmp_path / "detector_report.html").stat().st_size > 10_000
