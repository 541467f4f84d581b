"""The README's Python blocks run as written, in order, in a fresh interpreter: the README cannot drift
from the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fences of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_block_of_the_readme_runs_in_order(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    script = tmp_path / "readme_blocks.py"
    # Each block is announced, so a failure names the block it happened in.
    script.write_text("".join(f"print('--- README block {i}', flush=True)\n{block}\n" for i, block in enumerate(blocks, 1)),
                      encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    reached = re.findall(r"--- README block (\d+)", done.stdout)
    assert done.returncode == 0, (f"README block {reached[-1] if reached else '?'} failed:\n{done.stderr[-3000:]}")
    assert reached == [str(i) for i in range(1, len(blocks) + 1)]
