"""The README's drop-in example runs as written."""

import pathlib
import re


def test_readme_moe_example_runs(capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "MoEConfig(" in b)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["y"].shape == (4, 16, 512)
    recall = scope["block1"].recall()
    assert 0.0 <= recall["recall"] <= 1.0 and recall["set_recall"] == 1.0
    assert "recall" in capsys.readouterr().out
