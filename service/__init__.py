"""The classification service: Flask routes over the models in a graphs folder.

``service.app.create_app`` builds the WSGI app; ``python -m service`` serves it. Nothing is
imported here, so that ``python -m service`` can quiet TensorFlow before loading it.
"""
