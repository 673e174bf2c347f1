"""`python -m expertserve.train EXPERT_DIR ...`: the same as `expertserve train`, for `ray job submit`."""

import argparse
import sys

from expertserve.cli.main import run_handler
from expertserve.cli.train import add_arguments

parser = argparse.ArgumentParser(prog="python -m expertserve.train", description=__doc__)
add_arguments(parser)
parser.set_defaults(handler="expertserve.cli.train:run", command="train")
sys.exit(run_handler(parser.parse_args()))
