"""The pytest plugin of the course's tests: copied next to them as conftest.py, by the grader into a fresh folder
and by the handout into course/. It puts the code under test (COURSE_DIR, default: the folder above this one)
first on sys.path, gives the tests `check` (compare with the reference's snapshot, or record it), a time limit
per test, and writes each test's outcome to COURSE_RESULTS.

Environment: COURSE_MODE compare (default) or record; COURSE_SNAPSHOTS the snapshot file (default:
snapshots.pt here); COURSE_SEED the inputs' seed (default: the snapshots'); COURSE_DEVICE cpu or cuda;
COURSE_AMP fp32 or bf16 (the code under test runs under bf16 autocast, compared with fp32 snapshots);
COURSE_TIME_LIMIT seconds per test (default 60).
"""
import json
import os
import signal
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.environ.get('COURSE_DIR', os.path.join(HERE, '..'))))
MODE = os.environ.get('COURSE_MODE', 'compare')
SNAPSHOTS = os.environ.get('COURSE_SNAPSHOTS', os.path.join(HERE, 'snapshots.pt'))
AMP = os.environ.get('COURSE_AMP', 'fp32')
DEVICE = torch.device(os.environ.get('COURSE_DEVICE', 'cpu'))
LIMIT = int(os.environ.get('COURSE_TIME_LIMIT', 60))
# Relative error allowed against the fp32 reference: max |got - ref| / max |ref|. bf16 keeps 8 bits of
# mantissa, and a forward of a few layers compounds its rounding to about 1e-2.
TOLERANCE = {'fp32': 1e-4, 'bf16': 5e-2}


class Snapshots:
    """name -> the reference's output (tensors, numbers, or lists of them), recorded or loaded."""

    def __init__(self):
        self.values = {}
        self.seed = int(os.environ.get('COURSE_SEED', 0))
        if MODE == 'compare':
            stored = torch.load(SNAPSHOTS, weights_only=True)
            self.values, self.seed = stored['values'], int(os.environ.get('COURSE_SEED', stored['seed']))
            if self.seed != stored['seed']:
                raise RuntimeError(f"{SNAPSHOTS} holds seed {stored['seed']}'s inputs, not {self.seed}'s")
        os.environ['COURSE_SEED'] = str(self.seed)  # the tests draw their inputs from it

    def __call__(self, name, got, *alternatives):
        """Record `got` (and the alternatives, other outputs a correct implementation may give), or compare
        `got` with the recorded ones: it must match one of them."""
        got = as_float(got)
        if MODE == 'record':
            self.values[name] = [got, *map(as_float, alternatives)]
            return
        if name not in self.values:
            raise KeyError(f"no snapshot {name!r} in {SNAPSHOTS}")
        errors = [relative_error(got, ref) for ref in self.values[name]]
        assert min(errors) < TOLERANCE[AMP], (
            f"{name}: relative error {min(errors):.2e} against the reference (allowed {TOLERANCE[AMP]:.0e})")

    def given(self, name, make):
        """An input the reference computes when recording (make()) and the graded run loads, so that the
        tests never spell out a solution: e.g. the masking of a fixed order for the models that mask."""
        if MODE == 'record':
            self.values[name] = [as_float(v) if v.is_floating_point() else v.cpu() for v in make()]
        return [v.to(DEVICE) for v in self.values[name]]

    def save(self):
        torch.save({'seed': self.seed, 'values': self.values}, SNAPSHOTS)


def as_float(x):
    if isinstance(x, (list, tuple)):
        return [as_float(v) for v in x]
    if isinstance(x, dict):
        return {k: as_float(v) for k, v in x.items()}
    return torch.as_tensor(x).detach().float().cpu()


def relative_error(got, ref):
    if isinstance(ref, dict):
        if not isinstance(got, dict) or got.keys() != ref.keys():
            return float('inf')
        return max([relative_error(got[k], ref[k]) for k in ref], default=0.0)
    if isinstance(ref, list):
        if not isinstance(got, list) or len(got) != len(ref):
            return float('inf')
        return max([relative_error(g, r) for g, r in zip(got, ref)], default=0.0)
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
        return float('inf')
    error = (got - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-6)
    return error / scale if error == error else float('inf')  # NaN: never close


SNAP = Snapshots()


@pytest.fixture
def check():
    return SNAP


def pytest_configure(config):
    for i in range(1, 21):
        config.addinivalue_line('markers', f'A{i}: the tests of assignment A{i}')


def pytest_sessionfinish(session):
    if MODE == 'record':
        SNAP.save()


def on_alarm(signum, frame):
    raise TimeoutError(f"over the time limit of {LIMIT} s per test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)


RESULTS = {}


def pytest_runtest_logreport(report):
    if report.when == 'call' or report.outcome == 'failed':
        marks = [m for m in report.keywords if m.startswith('A') and m[1:].isdigit()]
        message = str(report.longrepr.reprcrash.message) if report.failed and hasattr(
            report.longrepr, 'reprcrash') else ''
        RESULTS[report.nodeid.split('::')[-1]] = {'assignment': marks[0] if marks else None,
                                                   'outcome': report.outcome, 'message': message[:300],
                                                   'seconds': round(report.duration, 2)}


def pytest_unconfigure(config):
    if os.environ.get('COURSE_RESULTS'):
        with open(os.environ['COURSE_RESULTS'], 'w') as f:
            json.dump(RESULTS, f, indent=1)
