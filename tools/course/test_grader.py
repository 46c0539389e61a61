"""The grader tells right from wrong: every known-wrong implementation loses points, every correct one (the
reference's and the different ones) scores full marks, a fresh handout scores zero, and no solution is left in
the handout. Run by CI as its own step: `python -m pytest -q tools/course/test_grader.py` (a few minutes)."""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.course import ASSIGNMENTS, BY_ID
from tools.course.grade import REPO, copy_tests, grade, record, run_tests
from tools.course.handout import make_handout, repository_files
from tools.course.source import solution_lines, stub, text, transplant
from tools.course.variants import CORRECT, VARIANTS, WRONG

SEED = 12345  # the grading inputs of this test (the grader draws a new seed by default)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp('course')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def submission(dest, assignment, functions):
    """A copy of this repository with `functions` {qualname: source} of `assignment` put in."""
    for name in repository_files(REPO):
        if name.endswith('.py'):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name))
    for qualname, source in functions.items():
        file = next(f for f, q in BY_ID[assignment].functions if q == qualname)
        path = os.path.join(dest, file)
        with open(path) as f:
            src = f.read()
        with open(path, 'w') as f:
            f.write(transplant(src, qualname, source))
    return dest


def test_every_assignment_names_functions_that_exist_and_every_variant_one_of_them():
    for a in ASSIGNMENTS:
        for file, qualname in a.functions:
            with open(os.path.join(REPO, file)) as f:
                assert text(f.read(), qualname).lstrip().startswith(('def ', '@'))
        kinds = VARIANTS[a.id]
        assert len(kinds[WRONG]) >= 2 and len(kinds[CORRECT]) >= 1, a.id
        for impl in [*kinds[WRONG].values(), *kinds[CORRECT].values()]:
            assert set(impl) <= {q for _, q in a.functions}, (a.id, set(impl))


def test_the_grader_scores_wrong_ones_below_full_marks_and_correct_ones_full(work):
    cases = [(aid, kind, name, impl) for aid, kinds in VARIANTS.items() for kind in (WRONG, CORRECT)
             for name, impl in kinds[kind].items()]
    tests = copy_tests(os.path.join(work, 'tests'))
    snapshots = record(tests, SEED)

    def one(case):
        aid, kind, name, impl = case
        code = submission(os.path.join(work, f'{aid}-{kind}-{abs(hash(name))}'), aid, impl)
        results = run_tests(code, tests, snapshots, marks=[aid], seed=SEED)
        shutil.rmtree(code, ignore_errors=True)
        failed = [t for t, r in results.items() if r['outcome'] != 'passed']
        return case, results, failed
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(one, cases))
    wrong_passed = [f"{aid} {name}" for (aid, kind, name, _), _, failed in outcomes if kind == WRONG and not failed]
    correct_failed = [f"{aid} {name}: {failed}" for (aid, kind, name, _), _, failed in outcomes
                      if kind == CORRECT and failed]
    assert not wrong_passed, f"known-wrong implementations that score full marks: {wrong_passed}"
    assert not correct_failed, f"correct implementations that lose points: {correct_failed}"


def test_the_reference_scores_full_marks_in_bf16(work):
    """The tolerances hold under bf16 autocast (the graded code in bf16, the snapshots fp32)."""
    tests = copy_tests(os.path.join(work, 'tests_bf16'))
    results = run_tests(REPO, tests, record(tests, SEED), seed=SEED, amp='bf16')
    assert all(r['outcome'] == 'passed' for r in results.values()), \
        {t: r['message'] for t, r in results.items() if r['outcome'] != 'passed'}


def test_a_handout_is_one_commit_with_every_stub_and_no_solution_and_scores_zero(work):
    out = make_handout(str(work / 'handout'))
    log = subprocess.run(['git', 'log', '--oneline', '--all'], cwd=out, capture_output=True, text=True).stdout
    assert len(log.splitlines()) == 1
    files = repository_files(out)
    assert 'test_all.py' not in files and not any(f.startswith('tools/course') for f in files)
    course = {'test_assignments.py', 'conftest.py', 'snapshots.pt', 'README.md'}
    assert {f'course/{name}' for name in course} <= set(files)
    # every function stubbed, its docstring kept; no line of a solution's body anywhere in the handout
    texts = {}
    for name in files:
        try:
            with open(os.path.join(out, name)) as f:
                texts[name] = f.read()
        except UnicodeDecodeError:
            continue
    leaks = []
    for a in ASSIGNMENTS:
        for file, qualname in a.functions:
            with open(os.path.join(REPO, file)) as f:
                reference = f.read()
            assert stub(reference, qualname, f'{a.id}') != reference
            assert f"raise NotImplementedError('{a.id}: " in text(texts[file], qualname)
            assert '"""' in text(texts[file], qualname), f"{qualname}: its docstring must stay"
            for line in solution_lines(reference, qualname):
                leaks += [f"{qualname}: {line!r} in {name}" for name, t in texts.items() if line in t]
    assert not leaks, leaks
    # the student's command on the course page collects an assignment's tests, which fail on the stubs
    own = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'course', '-m', 'A1'],
                         cwd=out, capture_output=True, text=True)
    assert own.returncode == 1 and ' failed' in own.stdout and ' passed' not in own.stdout, own.stdout[-2000:]
    # the handout's self-check runs and fails every test; the grader scores every assignment zero
    results = run_tests(out, os.path.join(out, 'course'), os.path.join(out, 'course', 'snapshots.pt'))
    assert results and all(r['outcome'] != 'passed' for r in results.values()), \
        [t for t, r in results.items() if r['outcome'] == 'passed']
    scores = grade(out, seed=SEED, work=str(work / 'grade'))
    assert {aid: passed for aid, (passed, _, _) in scores.items()} == {a.id: 0 for a in ASSIGNMENTS}
    full = grade(REPO, seed=SEED, work=str(work / 'grade_ref'))
    assert all(passed == total for passed, total, _ in full.values()), full
