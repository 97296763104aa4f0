"""Train a FLUX.2 LoRA: `accelerate launch train.py --config configs/quickstart.yaml [key.path=value ...]`."""

import argparse
import sys

from common.commands import HelpFormatter, silence_known_noise
from common.errors import run_guarded
from trainer.commands import add_train_arguments, train

if __name__ == "__main__":
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args()
    sys.exit(run_guarded(lambda: train(args)))
