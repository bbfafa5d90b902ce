"""One exception root: user errors are VitServeError subclasses, anything else is a bug."""

import contextlib
import enum
from typing import Any


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


class UnavailableError(ClientError):
    """The server could not be reached, or did not answer in time (try again later; not the input's fault)."""


def missing_extra(package: str, extra: str) -> VitServeError:
    """Error for an optional dependency that is not installed."""
    return VitServeError(f"{package} is not installed; install it with `pip install 'vitserve[{extra}]'`")


def enum_value(cls: type[enum.Enum], value: Any, what: str):
    """`value` as a member of the string enum `cls` (a member, or its value in any letter case); else
    ConfigError naming `what`, the value and the choices. The one enum parser (models.yaml, the client)."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        if isinstance(value, str) and value.lower() != value:
            with contextlib.suppress(ValueError):
                return cls(value.lower())
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{what}: {value!r} is not one of {choices}") from None
