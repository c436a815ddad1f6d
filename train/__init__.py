"""Command-line programs: ``python -m train.cifar`` trains and evaluates on CIFAR-10/100
(installed as ``ra-train``), ``python -m train.imagenet`` on an ImageNet-style folder
(``ra-train-imagenet``); ``python -m train.masks`` draws a checkpoint's attention masks (``ra-masks``).
What the training commands share is train/run.py's (the loop, the files, resume) and
train/checkpoint.py's (the format)."""
import os

# One OpenBLAS thread unless the user chose otherwise. The numpy backend's convolutions
# are im2col matrix products with few columns (16 to 256 output channels), and OpenBLAS's
# threads spin-wait for each other: measured on a 2-core machine shared with other work,
# one attention56 forward and backward at batch 64 took 2.9 to 3.0 s with one thread, and
# anywhere from 2.7 to 24 s with two (or the default), whenever another process wanted a
# core. One thread gives up at most ~10% on an idle machine and leaves a core to the data
# loader's thread. OpenBLAS reads the variable when NumPy loads it, so it is set here, in the
# package every command imports first, before their first NumPy import (it changes nothing where
# NumPy is loaded already).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
