"""The README's examples run as written."""
import os
import re


def test_readme_examples_run():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    blocks = re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
    assert len(blocks) >= 2
    namespace = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["feats"].shape == (8, 16, 32, 32)
    assert namespace["E"].check_equivariance(namespace["model"], namespace["x"], "c4") < 1e-4
    assert namespace["gen"].shape == (2, 14) and namespace["out"].logits.shape == (2, 6, 100)
