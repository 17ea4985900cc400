"""Signal controllers behind one interface shared with learned policies."""

from trainer.controllers.base import CONTROLLERS, Controller, make_controller

__all__ = ["CONTROLLERS", "Controller", "make_controller"]
