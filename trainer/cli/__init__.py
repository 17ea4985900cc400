"""`reled`, the trainer's command line: one module per command group, assembled in ``main``.

``scenarios`` (list, show, import), ``evaluate`` (eval), ``train`` (train, compare), ``demos``
(SED demonstrations), ``export`` (ONNX), ``record`` (detector recordings for the controllers' replay
sensor); ``options`` holds the flag groups whose defaults come from
the settings dataclasses, ``common`` the consoles, error handling and progress bar.
"""

from trainer.cli.main import app

__all__ = ["app"]
