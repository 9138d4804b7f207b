"""The classification service: Flask routes over the models in a graphs folder."""

from service.app import ServiceConfig, create_app

__all__ = ["ServiceConfig", "create_app"]
