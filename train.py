"""Entry for `accelerate launch train.py --config FILE [key.sub=value ...]`."""

import sys

from dreamtune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
