"""The student version of this repository: every assignment's functions stubbed, the tests with snapshots of
the reference for a self-check, a course page, as a new git repository with one commit (no solution in its
history). Left out: the reference's own test suite (it spells out solutions), this folder (the grader and its
known-wrong and correct implementations), the instructor's page and CI."""
import os
import shutil
import subprocess

from tools.course import ASSIGNMENTS
from tools.course.grade import REPO, copy_tests, run_tests
from tools.course.experiments import EXPERIMENTS, command, cost
from tools.course.source import stub

SEED = 0  # the handout's inputs; the grader draws its own
LEFT_OUT = ('test_all.py', 'tools/course/', 'docs/course.md', '.ci/')


def repository_files(root):
    """The files of the repository at `root`: tracked or not ignored, as git sees them (a tree walk without
    git, skipping what .gitignore names)."""
    try:
        out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if os.path.isfile(os.path.join(root, f))]
    except (OSError, subprocess.CalledProcessError):
        skip = ('.git', '.venv', 'runs', '__pycache__', '.pytest_cache')
        return [os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                if not any(part.startswith(skip) for part in os.path.relpath(d, root).split(os.sep)) for f in files]


def make_handout(out, seed=SEED):
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; pass a new folder")
    for name in repository_files(REPO):
        if not name.startswith(LEFT_OUT):
            os.makedirs(os.path.join(out, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(out, name))
    for a in ASSIGNMENTS:
        for file, qualname in a.functions:
            path = os.path.join(out, file)
            with open(path) as f:
                src = f.read()
            message = f"{a.id}: {file[:-3]}.{qualname} ({a.paper})"
            with open(path, 'w') as f:
                f.write(stub(src, qualname, message))
    course = copy_tests(os.path.join(out, 'course'))
    run_tests(REPO, course, os.path.join(course, 'snapshots.pt'), mode='record', seed=seed)
    with open(os.path.join(course, 'README.md'), 'w') as f:
        f.write(student_page())
    with open(os.path.join(out, 'README.md')) as f:
        readme = f.read()
    with open(os.path.join(out, 'README.md'), 'w') as f:
        f.write('> **Course handout.** The functions listed in [course/README.md](course/README.md) are yours to '
                'write; `python -m pytest -q course` checks them. The reference\'s own test suite is not part of '
                'the handout.\n\n' + readme)
    git = ['git', '-c', 'user.name=course', '-c', 'user.email=course@localhost', '-c', 'init.defaultBranch=main']
    for argv in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'Handout']):
        subprocess.run(git + argv, cwd=out, check=True, capture_output=True)
    return out


def student_page():
    lines = ['# The assignments', '',
             'Implement the functions of each assignment in order: each needs only the ones before it (the encoder '
             'needs A1 to be built at all). Each stub keeps its signature and docstring; the docstring states every '
             'convention your code must follow where the paper leaves one open (token order, variance, where a '
             'schedule ends). Read the paper section named with it, then the code around the stub.', '',
             'Check your work: `python -m pytest -q course -m A1` (one assignment) or `python -m pytest -q course` '
             '(all). The tests compare your outputs with the reference implementation\'s on fixed inputs '
             '(course/snapshots.pt); the grader uses other inputs and clean copies of the tests, and grades each '
             'assignment with the reference in place of the others, so an earlier mistake does not cost you twice.',
             '', '| id | what | functions | paper | hours (expected) | CPU seconds (grading) |', '|---|---|---|---|---|---|']
    for a in ASSIGNMENTS:
        functions = ', '.join(f"`{file[:-3]}.{q}`" for file, q in a.functions)
        lines.append(f"| {a.id} | {a.title} | {functions} | {a.paper} | {a.hours} | {a.cpu_s} |")
    lines += ['', '## Experiments', '',
              'On the built-in benchmark, once your implementation passes; S is a pre-training seed of your choice '
              '(two, where you can). Before each run, write down what you expect; after it, what you measured, with '
              'the seeds: linear probes (`python finetune.py --ckpt C --data synth:instrument --seed P`, and '
              '`synth:event`; probe seeds 0, 1, 2) and zero-shot (`python zeroshot.py --ckpt C --data synth:event`). '
              'Your instructor re-runs the probes on your checkpoints.', '']
    for e in EXPERIMENTS:
        lines += [f"- **{e.id}. {e.title}** ({cost(e)}): {e.question}", '',
                  '  ```bash', *[f'  {command(flags).strip()}' for flags in e.runs.values()], '  ```', '']
    return '\n'.join(lines) + '\n'
