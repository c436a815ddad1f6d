"""Command-line programs: ``python -m train.cifar`` trains and evaluates on CIFAR-10/100
(installed as ``ra-train``); ``python -m train.masks`` draws a checkpoint's attention masks."""
