"""The README's example runs as written."""
import os
import re


def test_readme_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    code = re.search(r"```python\n(.*?)```", open(path).read(), re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["feats"].shape == (8, 16, 32, 32)
    assert namespace["E"].check_equivariance(namespace["model"], namespace["x"], "c4") < 1e-4
