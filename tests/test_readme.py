"""The README's quickstart is executed, so it cannot rot."""
import pathlib
import re


def test_readme_quickstart_runs(capsys):
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], "README.md:quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "chunked vs recurrent:" in out and "equivalence vs 'recurrent'" in out
