"""Every Python code block in the README runs, so an example can never rot
(issue 13, point 16).  A block that connects to a scheduler address is run
against the session's real test cluster instead."""

import os
import re

import pytest

from harness import run_script

pytestmark = pytest.mark.timeout(300)

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ADDRESS = re.compile(r"address=\"(tcp://[^\"]+)\"")


def python_blocks():
    with open(README) as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```$", text, re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, request):
    source = python_blocks()[index]
    if ADDRESS.search(source):
        pytest.importorskip("distributed")
        cluster = request.getfixturevalue("dask_clusters").get()
        source = ADDRESS.sub(f'address="{cluster.address}"', source)
    # Under the `__main__` guard, as a script using process-based runners
    # must be written.
    script = "if __name__ == '__main__':\n" + "".join(
        f"    {line}\n" for line in source.splitlines())
    proc = run_script(script, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
