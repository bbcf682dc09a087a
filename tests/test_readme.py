"""The README's example runs as written."""

import pathlib
import re


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(namespace["loss"]) < 1.0
