#!/usr/bin/env python3
"""Retrain a pretrained MobileNet on folders of images. Run with --help for the flags."""

from imageclf.cli_common import missing_packages_exit

with missing_packages_exit("retrain.py"):  # outside the project's virtualenv: one line, not a traceback
    from imageclf.retrain_cli import entry_point

if __name__ == "__main__":
    entry_point()
