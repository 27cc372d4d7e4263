"""Test harness: multi-process rings on 127.0.0.1 and references.

* :class:`RingCluster` - one ``pccl.testing.ring_worker`` process per rank
  of a :class:`pccl.StaticRing`, driven by JSON lines, every wait bounded.
* :mod:`pccl.testing.reference` - deterministic inputs and numpy/torch
  references for every dtype x op, with error bounds for floating and
  quantized reductions.

Worker code lives in the installed package (not in ``tests/``) so child
processes can import it.
"""

from .cluster import RingCluster, WorkerError, WorkerProcess

__all__ = ["RingCluster", "WorkerError", "WorkerProcess"]
