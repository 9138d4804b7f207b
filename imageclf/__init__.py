"""imageclf: retrain a pretrained MobileNet on folders of photos and serve the frozen graph.

The command-line tools (retrain.py, label_image.py, the service) are thin wrappers around
this package; see README.md.
"""

__version__ = "0.1.0"
