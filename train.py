"""Train a FLUX.2 LoRA: `accelerate launch train.py --config configs/quickstart.yaml [key.path=value ...]`."""

import argparse
import sys

from trainer.cli import add_train_arguments, cmd_train, run_guarded

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_train_arguments(parser)
    args = parser.parse_args()
    sys.exit(run_guarded(lambda: cmd_train(args)))
