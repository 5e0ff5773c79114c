"""What the A/B scripts share: running one round of code in a fresh
interpreter that imports taskrunner from a checkout, and alternating the
checkouts round by round."""

import os
import statistics
import subprocess
import sys


def run_in_tree(tree, code, name):
    """The output of `code` (the body of a main block) run by a fresh
    interpreter with `tree` first on its path and as its argv[1]."""
    env = dict(os.environ, PYTHONPATH=tree)
    # A script file, not -c: spawned workers must be able to import __main__.
    script = os.path.join(tree, f".{name}.py")
    with open(script, "w") as f:
        f.write("if __name__ == '__main__':\n" + "".join(
            "    " + line + "\n" for line in code.strip().splitlines()))
    try:
        return subprocess.run([sys.executable, script, os.path.abspath(tree)], env=env,
                              check=True, capture_output=True, text=True).stdout
    finally:
        os.remove(script)


def alternate(rounds, trees, one_round):
    """{tree: [one_round(tree) for each round]}, the trees taking turns."""
    trees = [os.path.abspath(t) for t in trees]
    results = {tree: [] for tree in trees}
    for _ in range(rounds):
        for tree in trees:
            results[tree].append(one_round(tree))
    return results


def timed_pair(code, name):
    """A round for alternate(): `code` run in the tree prints our time and
    the peer's, last, and the round returns them as (ours, peer)."""
    def one_round(tree):
        ours, peer = map(float, run_in_tree(tree, code, name).split()[-2:])
        return ours, peer
    return one_round


def report(results, peer):
    """Per tree, the median of our times and of the ratios peer/ours."""
    for tree, samples in results.items():
        ours = statistics.median(o for o, _ in samples)
        ratios = [round(p / o, 2) for o, p in samples]
        print(f"{tree}: ours {ours * 1000:.0f} ms, {peer}/ours {statistics.median(ratios)} "
              f"(rounds: {ratios})")
