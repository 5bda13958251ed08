"""Regenerate examples/sks_toy/: the procedural concept the tests train on."""

import argparse

from dreamtune.data.synthetic import write_concept_folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="examples/sks_toy")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--caption", default="a photo of sks toy")
    args = parser.parse_args()
    for path in write_concept_folder(args.out, args.count, args.seed, args.caption):
        print(path)
