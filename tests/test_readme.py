"""The README's example block runs as written (on the CPU it uses the tiled backend)."""

import pathlib
import re


def test_readme_examples_run():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Examples\s+```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 16, 1024, 64)  # the last line: the SDPA drop-in, (B, H, N, D)
