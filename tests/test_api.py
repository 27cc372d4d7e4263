"""The public surface of ``import pccl``: what is exported, the version,
typing, handle and error types (docs/api.md)."""

from __future__ import annotations

import importlib.metadata
import inspect
import socket
from pathlib import Path

import numpy as np
import pytest

import pccl


def test_internal_classes_are_not_exported():
    for name in ("NativeComm", "AllReduceHandle"):
        assert not hasattr(pccl, name), name
        assert name not in pccl.__all__
    for name in pccl.__all__:
        assert hasattr(pccl, name), name


def test_version_comes_from_the_installed_distribution():
    assert pccl.__version__ == importlib.metadata.version("pccl")
    assert pccl.version() == pccl.__version__  # the compiled core says the same


def test_py_typed_is_installed():
    assert (Path(pccl.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    "fn",
    [
        pccl.Communicator.all_reduce,
        pccl.Communicator.all_reduce_async,
        pccl.StaticRing.all_reduce,
        pccl.StaticRing.all_reduce_async,
    ],
)
def test_op_quantization_tag_are_keyword_only(fn):
    params = inspect.signature(fn).parameters
    for name in ("op", "quantization", "tag"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn, name)
    assert params["out"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def _public_callables():
    import enum

    import pccl.diloco

    modules = [pccl, pccl.diloco]
    for mod in modules:
        for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
            obj = getattr(mod, name)
            if getattr(obj, "__module__", "").split(".")[0] != "pccl":
                continue
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj) and not issubclass(obj, (BaseException, enum.Enum)):
                for meth, fn in inspect.getmembers(obj, inspect.isfunction):
                    if fn.__module__.split(".")[0] != "pccl":
                        continue  # dataclass-generated or inherited from the stdlib
                    if not meth.startswith("_") or meth == "__init__":
                        yield f"{name}.{meth}", fn


def test_public_calls_have_type_hints():
    missing = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if params and params[0].name in ("self", "cls"):
            params = params[1:]
        for p in params:
            if p.annotation is inspect.Parameter.empty and p.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD
            ):
                missing.append(f"{name}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert missing == []


def test_static_ring_handle_is_the_same_type():
    with pccl.StaticRing(0, 1) as ring:
        ring.connect([ring.address], timeout=10)
        h = ring.all_reduce_async(np.ones(4, np.float32))
        assert isinstance(h, pccl.ReduceHandle)
        assert h.wait(timeout=10).world_size == 1 and h.done()


def test_master_node_raises_pccl_errors():
    with pytest.raises(pccl.AddressError) as ei:
        pccl.MasterNode(listen="no port here")
    assert isinstance(ei.value, ValueError)
    with pytest.raises(pccl.InvalidArgumentError):
        pccl.MasterNode(heartbeat_interval=5.0, heartbeat_timeout=1.0)
    with pytest.raises(pccl.InvalidArgumentError):
        pccl.MasterNode(secret=b"")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(pccl.PcclOSError) as oe:
            pccl.MasterNode(listen=f"127.0.0.1:{port}").start()
        assert isinstance(oe.value, OSError) and oe.value.errno is not None
    with pccl.MasterNode() as node:
        with pytest.raises(pccl.StateError):
            node.start()
