"""Golden text files: compared exactly; regenerated only with TORCHPROBE_REGEN_GOLDEN=1."""
import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("TORCHPROBE_REGEN_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with TORCHPROBE_REGEN_GOLDEN=1 to write it"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from its golden file (TORCHPROBE_REGEN_GOLDEN=1 rewrites it)"
