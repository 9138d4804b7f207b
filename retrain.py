#!/usr/bin/env python3
"""Retrain a pretrained MobileNet on folders of images. Run with --help for the flags."""

from imageclf.retrain_cli import entry_point

if __name__ == "__main__":
    entry_point()
