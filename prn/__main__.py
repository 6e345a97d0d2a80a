"""``python -m prn``: the command line, as torchrun starts it.

    torchrun --nproc_per_node 2 -m prn fit --dataset mvtec --root /data/mvtec --category bottle
"""

from prn.cli import entry

if __name__ == "__main__":
    entry()
