#!/usr/bin/env python3
"""Classify one image with a frozen graph. Run with --help for the flags."""

from imageclf.cli_common import missing_packages_exit

with missing_packages_exit("label_image.py"):  # outside the project's virtualenv: one line, not a traceback
    from imageclf.label_image_cli import entry_point

if __name__ == "__main__":
    entry_point()
