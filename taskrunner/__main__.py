"""`python -m taskrunner`: command-line entry points (`bench`)."""

import argparse
import sys

from taskrunner import bench


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m taskrunner",
        description="taskrunner: the task-runner API of prefect.task_runners on a compiled core.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="run the benchmark workloads against their peers and print the table",
        description="Run each workload with taskrunner and its peers (same worker count, "
                    "same run) and print medians, ratios and the spec's targets.")
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
