"""The grader: each assignment of a folder graded on its own, by clean copies of the tests.

For assignment A, a copy of the folder gets the reference's implementation of every other assignment's
functions, so that A's score depends on A's code alone. The tests (tools/course/tests.py, copied afresh into a
temporary folder: a student's edits to the handout's copy change nothing) compare its outputs with the
reference's on inputs drawn from a seed no handout has seen, recorded first from this repository."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tools.course import ASSIGNMENTS, BY_ID
from tools.course.source import text, transplant

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SOURCES = sorted({file for a in ASSIGNMENTS for file, _ in a.functions})
TESTS = 'test_assignments.py'  # tests.py's name in a tests folder


def copy_tests(dest):
    """A fresh folder holding the clean tests (named so that pytest collects them) and their harness (as
    conftest.py)."""
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(HERE, 'tests.py'), os.path.join(dest, TESTS))
    shutil.copy(os.path.join(HERE, 'harness.py'), os.path.join(dest, 'conftest.py'))
    return dest


def run_tests(code_dir, tests_dir, snapshots, mode='compare', marks=None, seed=None, amp='fp32', device='cpu',
              time_limit=60):
    """Run the tests of `marks` (assignment ids; all without) on the code in code_dir. Returns {test name:
    {'assignment', 'outcome', 'message'}}."""
    results = os.path.join(tests_dir, f'results-{os.getpid()}-{time.monotonic_ns()}.json')
    env = {**os.environ, 'COURSE_DIR': code_dir, 'COURSE_MODE': mode, 'COURSE_SNAPSHOTS': snapshots,
           'COURSE_AMP': amp, 'COURSE_DEVICE': device, 'COURSE_TIME_LIMIT': str(time_limit),
           'COURSE_RESULTS': results, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    if seed is not None:
        env['COURSE_SEED'] = str(seed)
    argv = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', os.path.join(tests_dir, TESTS)]
    if marks:
        argv += ['-m', ' or '.join(marks)]
    proc = subprocess.run(argv, cwd=tests_dir, env=env, capture_output=True, text=True,
                          timeout=time_limit * 40)
    if not os.path.exists(results):
        raise RuntimeError(f"the tests did not run on {code_dir}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(results) as f:
        out = json.load(f)
    os.remove(results)
    if mode == 'record' and any(r['outcome'] != 'passed' for r in out.values()):
        raise RuntimeError(f"the reference fails its own tests:\n{proc.stdout[-3000:]}")
    return out


def record(tests_dir, seed):
    """Snapshots of the reference (this repository) for the inputs of `seed`."""
    path = os.path.join(tests_dir, f'reference-{seed}.pt')
    if not os.path.exists(path):
        run_tests(REPO, tests_dir, path, mode='record', seed=seed)
    return path


def composite(folder, assignment, dest):
    """A copy of `folder` whose functions of every assignment but `assignment` are the reference's."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns('.git', '__pycache__', 'runs', '.venv*'))
    for name in SOURCES:
        path = os.path.join(dest, name)
        with open(os.path.join(REPO, name)) as f:
            reference = f.read()
        try:
            with open(path) as f:
                src = f.read()
            for a in ASSIGNMENTS:
                if a.id != assignment:
                    for file, qualname in a.functions:
                        if file == name:
                            src = transplant(src, qualname, text(reference, qualname))
        except (OSError, SyntaxError, KeyError, StopIteration) as e:
            print(f"warning: {path}: {type(e).__name__}: {e}; {assignment} scores 0", file=sys.stderr)
            return None
        with open(path, 'w') as f:
            f.write(src)
    return dest


def grade(folder, ids=None, seed=None, amp='fp32', device='cpu', jobs=2, time_limit=60, work=None):
    """{assignment id: (passed, total, {test: result})} for the assignments `ids` (all without) of `folder`."""
    ids = ids or [a.id for a in ASSIGNMENTS]
    seed = int.from_bytes(os.urandom(3), 'big') if seed is None else seed
    work = work or tempfile.mkdtemp(prefix='grade-')
    tests_dir = copy_tests(os.path.join(work, 'tests'))
    snapshots = record(tests_dir, seed)

    def one(aid):
        code = composite(os.path.abspath(folder), aid, os.path.join(work, f'{aid}-{time.monotonic_ns()}'))
        if code is None:
            return aid, (0, count_tests(aid), {})
        try:
            results = run_tests(code, tests_dir, snapshots, marks=[aid], seed=seed, amp=amp, device=device,
                                time_limit=time_limit)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # the code under test ended the process
            print(f"warning: {aid}: the tests did not run to the end ({str(e).splitlines()[0]}); it scores 0",
                  file=sys.stderr)
            results = {}
        finally:
            shutil.rmtree(code, ignore_errors=True)
        passed = sum(r['outcome'] == 'passed' for r in results.values())
        return aid, (passed, max(len(results), count_tests(aid)), results)
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, ids))


def count_tests(aid):
    with open(os.path.join(HERE, 'tests.py')) as f:
        return f.read().count(f"@mark['{aid}']")


def table(scores):
    """The score table: per assignment its tests passed of all and their seconds, then the failures' first lines."""
    lines = ['| assignment | title | tests passed | score | test seconds |', '|---|---|---|---|---|']
    for aid, (passed, total, results) in scores.items():
        seconds = sum(r.get('seconds', 0) for r in results.values())
        lines.append(f"| {aid} | {BY_ID[aid].title} | {passed} / {total} | {100 * passed / total:.0f} % | "
                     f"{seconds:.1f} |")
    earned = sum(p / t for p, t, _ in scores.values())
    lines.append(f"| total | | | {100 * earned / len(scores):.0f} % | |")
    failures = [f"{aid} {name}: {r['message'] or r['outcome']}" for aid, (_, _, res) in scores.items()
                for name, r in res.items() if r['outcome'] != 'passed']
    return '\n'.join(lines + ([''] + failures if failures else []))
