"""One exception root: user errors are VitServeError subclasses, anything else is a bug."""


class VitServeError(Exception):
    """An error the user can act on; the message names the bad input and what to do."""


class ConfigError(VitServeError):
    """A configuration value or command-line argument was refused."""


class ExportError(VitServeError):
    """Building, exporting or verifying a model failed."""


class ParityError(ExportError):
    """An exported model does not compute what the PyTorch model computes."""


class CalibrationError(ExportError):
    """The calibration or evaluation images could not be used."""


class ServerError(VitServeError):
    """The Triton server could not be started, reached or stopped."""


class ClientError(VitServeError):
    """A request to a deployed model failed."""


def missing_extra(package: str, extra: str) -> VitServeError:
    """Error for an optional dependency that is not installed."""
    return VitServeError(f"{package} is not installed; install it with `pip install 'vitserve[{extra}]'`")
