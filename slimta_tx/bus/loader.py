"""Plugging in a user-written bus (``--bus dotted.path``) and running a bus's lifecycle.

The contract for ``--bus``
--------------------------

``--bus mypackage.mymodule:MyBus`` (or ``mypackage.mymodule.MyBus``) names an object that is
importable on ``sys.path`` or, failing that, from the current directory (as gunicorn and uvicorn
load an application: ``--bus mybus:MyBus`` finds ``./mybus.py``; the directory is searched
last, so it never hides an installed module). ``--bus path/to/mybus.py:MyBus`` loads that file.
The object may be:

1. an object with a ``send`` method (a ready bus): used as it is;
2. a class or factory that takes ``(config, reactor)``: called with the parsed options (a
   mapping: ``config["maildir"]``, ``config["max-size"]``, ...) and the running reactor;
3. a class or factory that takes no arguments: called with none.

What it returns (or is) must have ``send(envelope)`` returning a
:class:`~slimta_tx.reply.Reply`, a Deferred firing with one, or a coroutine. ``2xx`` means the
message is safe (see :class:`~slimta_tx.interfaces.IBus`); an exception becomes
``451 4.3.0``. The bus must have finished reading ``envelope.message`` when it answers.

Optionally the bus has ``start()`` (called once when the service starts; may return a
Deferred) and ``stop()`` (called after the edge has drained its sessions at shutdown, so no
message is still being handed over; may return a Deferred that the shutdown waits for).
:class:`BusService` does this; ``twistd slimta`` adds one for every bus.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

__all__ = ["BusLoadError", "BusService", "load_bus", "resolve"]


class BusLoadError(ValueError):
    """The dotted path names nothing importable, or nothing that makes a bus."""


def resolve(path: str) -> Any:
    """Import ``"pkg.module:attr"``, ``"pkg.module.attr"`` or ``"dir/file.py:attr"`` and
    return the attribute."""
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.rpartition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise BusLoadError(f"{path!r} is not a dotted path like 'package.module:BusClass'")
    if module_name.endswith(".py") or os.sep in module_name:
        module = _load_file(module_name)
    else:
        module = _import(module_name)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise BusLoadError(f"{module_name!r} has no attribute {attr_path!r}") from None
    return target


def _import(module_name: str) -> ModuleType:
    """Import from ``sys.path``; a top-level module found nowhere there is looked for in the
    current directory, which is then added at the end of ``sys.path``."""
    top = module_name.partition(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != top or here in sys.path or "" in sys.path:
            raise BusLoadError(f"cannot import {module_name!r}: {e}") from None
        if not (os.path.isfile(f"{top}.py") or os.path.isdir(top)):
            raise BusLoadError(
                f"cannot import {module_name!r}: {e} (not on sys.path nor in {here})"
            ) from None
        sys.path.append(here)
    except ImportError as e:
        raise BusLoadError(f"cannot import {module_name!r}: {e}") from None
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise BusLoadError(f"cannot import {module_name!r}: {e}") from None


def _load_file(filename: str) -> ModuleType:
    """Load a module from a file; its directory goes at the end of ``sys.path`` so that the
    modules beside it can be imported."""
    filename = os.path.abspath(filename)
    if not os.path.isfile(filename):
        raise BusLoadError(f"cannot import {filename!r}: no such file")
    name = os.path.splitext(os.path.basename(filename))[0]
    spec = importlib.util.spec_from_file_location(name, filename)
    if spec is None or spec.loader is None:
        raise BusLoadError(f"cannot import {filename!r}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(filename)
    if directory not in sys.path:
        sys.path.append(directory)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise BusLoadError(f"cannot import {filename!r}: {type(e).__name__}: {e}") from None
    return module


def _takes_config_and_reactor(factory: Any) -> bool:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins
        return False
    try:
        signature.bind(None, None)
    except TypeError:
        return False
    return True


def load_bus(path: str, config: Mapping[str, Any] | None = None, reactor: Any = None) -> Any:
    """Build the bus that ``path`` names (see the module docstring for the contract)."""
    target = resolve(path)
    if not inspect.isclass(target) and callable(getattr(target, "send", None)):
        return target
    if not callable(target):
        raise BusLoadError(f"{path!r} is neither a bus nor a class or factory making one")
    if _takes_config_and_reactor(target):
        bus = target(config if config is not None else {}, reactor)
    else:
        try:
            inspect.signature(target).bind()
        except TypeError:
            raise BusLoadError(f"{path!r} must take (config, reactor) or no arguments") from None
        except ValueError:
            pass
        bus = target()
    if not callable(getattr(bus, "send", None)):
        raise BusLoadError(f"{path!r} made {bus!r}, which has no send(envelope) method")
    return bus


class BusService(Service):
    """Starts the bus with the application; stops it after the edge has drained.

    :param bus: any bus; ``start``/``stop`` are called only if it has them.
    :param edge: the :class:`~slimta_tx.factory.SmtpEdge` (its ``close()`` is idempotent, so
        waiting for it here does not close it twice), or None.
    """

    log = Logger()

    def __init__(self, bus: Any, edge: Any = None) -> None:
        self.bus = bus
        self.edge = edge

    def startService(self) -> None:
        super().startService()
        start = getattr(self.bus, "start", None)
        if callable(start):
            maybeDeferred(start).addErrback(
                lambda f: self.log.failure("starting the bus failed", f)
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        drained: Deferred[Any] = Deferred()
        if self.edge is not None:
            # Watch the edge's shared close Deferred without changing its result.
            def fire(result: object) -> object:
                drained.callback(None)
                return result

            self.edge.close().addBoth(fire)
        else:
            drained.callback(None)

        def stop_bus(_: object) -> Deferred[Any]:
            stop = getattr(self.bus, "stop", None)
            if not callable(stop):
                return succeed(None)
            return maybeDeferred(stop).addErrback(
                lambda f: self.log.failure("stopping the bus failed", f)
            )

        result: Deferred[None] = drained.addBoth(stop_bus)
        return result
