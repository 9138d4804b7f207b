#!/usr/bin/env python3
"""Classify one image with a frozen graph. Run with --help for the flags."""

from imageclf.label_image_cli import entry_point

if __name__ == "__main__":
    entry_point()
