"""python -m tools.course handout|grade|experiments|probe|measure ... (docs/course.md)."""
import argparse
import sys

from tools.course import ASSIGNMENTS, BY_ID


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m tools.course', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)
    h = sub.add_parser('handout', help='write the student version into a new folder, a git repository')
    h.add_argument('--out', required=True)
    g = sub.add_parser('grade', help='grade a handout folder; print the score table')
    g.add_argument('folder')
    g.add_argument('assignments', nargs='*', help='A1 ... (default: all)')
    g.add_argument('--amp', choices=['fp32', 'bf16'], default='fp32', help='run the graded code under bf16 autocast')
    g.add_argument('--device', default='cpu')
    g.add_argument('--seed', type=int, help="the inputs' seed (default: a new one each time)")
    g.add_argument('--jobs', type=int, default=2, help='assignments graded at once')
    g.add_argument('--time_limit', type=int, default=60, help='seconds per test')
    sub.add_parser('experiments', help='the experiments: commands, CPU minutes, measured ranges')
    e = sub.add_parser('probe', help="re-run an experiment's measurement on submitted checkpoints")
    e.add_argument('experiment')
    e.add_argument('ckpts', nargs='+', metavar='RUN=CKPT', help="each of the experiment's runs and its checkpoint")
    e.add_argument('--probe_seeds', type=int, nargs='+', default=[0, 1, 2])
    m = sub.add_parser('measure', help='probe the runs of every experiment in a folder (<run>_s<seed>/), per seed')
    m.add_argument('folder')
    m.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='pre-training seeds')
    m.add_argument('--probe_seeds', type=int, nargs='+', default=[0, 1, 2])
    m.add_argument('--ranges', action='store_true', help='write the ranges they give to tools/course/ranges.json')
    args = p.parse_args(argv)
    if args.command == 'handout':
        from tools.course.handout import make_handout
        print(f"wrote {make_handout(args.out)}: one commit; python -m tools.course grade {args.out}")
    elif args.command == 'grade':
        from tools.course.grade import grade, table
        unknown = [a for a in args.assignments if a not in BY_ID]
        if unknown:
            p.error(f"no assignment {unknown}; choose from {[a.id for a in ASSIGNMENTS]}")
        scores = grade(args.folder, args.assignments, args.seed, args.amp, args.device, args.jobs, args.time_limit)
        print(table(scores))
    elif args.command == 'experiments':
        from tools.course.experiments import describe
        print(describe())
    elif args.command == 'probe':
        from tools.course.experiments import check_submission
        print(check_submission(args.experiment, args.ckpts, args.probe_seeds))
    else:
        from tools.course.experiments import markdown, measure_runs
        print(markdown(measure_runs(args.folder, args.seeds, args.probe_seeds, args.ranges)))


if __name__ == '__main__':
    main(sys.argv[1:])
