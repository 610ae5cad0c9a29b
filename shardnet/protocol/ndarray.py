"""Move tensors and embeddings between numpy and the docarray ``NdArray`` message.

Dense arrays travel as raw buffer + shape + numpy dtype string (``dtype.str``: ``<f4``, ``<U2``, ``|S2``,
``<M8[D]``), as docarray writes them; sparse ones as COO (indices, values, shape), which numpy can rebuild
without scipy.
``cls_name`` says whose layout a sparse array uses, as docarray writes it:
``torch`` keeps its indices as (ndim, nnz), ``scipy`` and ``tensorflow`` as
(nnz, ndim).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Optional, Union

import numpy as np

from shardnet.errors import ProtocolError
from shardnet.protocol.budget import MAX_DENSE_BYTES, DenseBudget
from shardnet.protocol.proto import docarray_pb2

# dtypes whose buffer is plain data of a fixed size: numbers, and the strings (U: UCS-4), bytes (S) and
# datetimes and timedeltas (M, m: int64 counts) docarray sends the same way. Object and void dtypes (and so
# any with fields or subarrays, which are void) would mean pickles or raw memory.
_PLAIN_KINDS = frozenset("biufcUSMm")
_NUMERIC_KINDS = frozenset("biufc")  # what a sparse array's values may be: densifying adds them up
_TRAVELLING = "numbers, strings, bytes, datetimes and timedeltas"
MAX_CODE_POINT = 0x10FFFF  # past it a UCS-4 unit is no character: numpy raises SystemError reading it as str
MAX_DIMS = 64  # numpy's own limit (32 before 2.0); more dimensions are refused before anything is computed from them
# the longest numeric name numpy spells is "clongdouble", "timedelta64[ns]" a long time one: 32 leaves room for
# byte order, aliases and a unit's multiple
MAX_DTYPE_NAME = 32
def _sendable(array: Any, kinds: frozenset[str] = _PLAIN_KINDS) -> np.ndarray:
    """``array`` as numpy, refused unless of one of ``kinds``: checked before a message is touched, so a refused
    value leaves what was there."""
    if isinstance(array, np.ma.MaskedArray) or (isinstance(array, (list, tuple)) and _holds_masked(array)):
        # its mask would be dropped without a word (a masked element of a list read as NaN)
        raise ProtocolError("cannot send a masked array: its mask does not travel; fill it first (array.filled())")
    try:
        array = np.asarray(array)
    except (TypeError, ValueError) as exc:  # ragged lists, say: numpy's words, as a refusal naming the field
        raise ProtocolError(f"cannot send this as an array: {exc}") from None
    if array.dtype.kind not in kinds:
        travelling = _TRAVELLING if kinds is _PLAIN_KINDS else "numbers"
        raise ProtocolError(f"cannot send an array of dtype {array.dtype}: only {travelling} travel")
    if _unitless_time(array.dtype):  # refused when read: refused before it leaves, where its cause is
        raise ProtocolError(f"cannot send an array of dtype {array.dtype}: a time without a unit; give it one "
                            "(datetime64[s], say)")
    return array


def _holds_masked(items: Union[list, tuple]) -> bool:
    """Whether nested lists hold a masked array or numpy's ``masked`` constant (itself a MaskedArray)."""
    stack = [items]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ma.MaskedArray):
            return True
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _unitless_time(dtype: np.dtype) -> bool:
    """A datetime64 or timedelta64 without a unit ('<M8'): numpy hands its values out as None."""
    return dtype.kind in "Mm" and np.datetime_data(dtype)[0] == "generic"


def write_dense(array: np.ndarray, target: docarray_pb2.DenseNdArrayProto) -> None:
    """Store ``array`` (C-contiguous copy if needed) into a DenseNdArray message."""
    array = _sendable(array)
    target.buffer = np.ascontiguousarray(array).tobytes()
    del target.shape[:]
    target.shape.extend(array.shape)
    target.dtype = array.dtype.str


def read_dense(source: docarray_pb2.DenseNdArrayProto) -> np.ndarray:
    """Rebuild a numpy array from a DenseNdArray message, checking size against shape."""
    dtype = _plain_dtype(source.dtype)
    shape = _shape(source.shape)
    # Python integers: a huge shape cannot wrap around to the buffer's size
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(source.buffer):
        raise ProtocolError(
            f"NdArray buffer holds {len(source.buffer)} bytes, shape {shape} of {dtype} needs {expected}"
        )
    # a writable copy: handlers edit embeddings in place, and the message must not change under them
    data = bytearray(source.buffer)
    if dtype.kind == "U":
        _check_code_points(data, dtype)
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # numpy refuses some empty shapes, (0, 2**30, 2**30) say, as too big
        raise ProtocolError(f"NdArray shape {shape} of {dtype} is not usable: {exc}") from None


def _check_code_points(data: bytearray, dtype: np.dtype) -> None:
    """Refuse a string buffer holding a unit past U+10FFFF: numpy would hand it out and fail (SystemError) only
    when a handler reads that element."""
    units = np.frombuffer(data, dtype=np.dtype("u4").newbyteorder(dtype.byteorder))
    if len(units) and units.max() > MAX_CODE_POINT:
        raise ProtocolError(f"NdArray of {dtype} holds {int(units.max()):#x}, past U+10FFFF: not a character")


def _shape(dimensions) -> tuple[int, ...]:
    """The shape a message gives, refused past MAX_DIMS dimensions (a product over 500,000 of them took seconds)."""
    if len(dimensions) > MAX_DIMS:
        raise ProtocolError(f"NdArray shape has {len(dimensions)} dimensions; at most {MAX_DIMS} are taken")
    return tuple(dimensions)


def _plain_dtype(name: str) -> np.dtype:
    """The dtype a message names, refused unless plain data of a fixed size; a name longer than any numpy spells
    is refused before it is parsed or cached (numpy reads ``'<i' + '0' * 10**6 + '4'`` as int32, and the cache
    would keep it)."""
    if len(name) > MAX_DTYPE_NAME:
        raise ProtocolError(f"NdArray dtype name has {len(name)} characters; at most {MAX_DTYPE_NAME} are taken")
    return _parsed_dtype(name)


@functools.lru_cache(maxsize=128)  # a stream of arrays names a handful of dtypes
def _parsed_dtype(name: str) -> np.dtype:
    with warnings.catch_warnings():
        # numpy still parses deprecated aliases ('a', read as 'S')
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            dtype = np.dtype(name)
        except Exception:  # TypeError, ValueError, and SyntaxError for some strings (',')
            # not chained: numpy's message quotes the whole name, and an error answer carries its causes
            raise ProtocolError(f"NdArray has an unknown dtype {name!r}") from None
    if dtype.kind not in _PLAIN_KINDS:
        raise ProtocolError(f"NdArray dtype {name!r} is not plain data ({_TRAVELLING}); refusing to decode it")
    if dtype.itemsize == 0:  # 'U0', 'S': numpy reads no array of them
        raise ProtocolError(f"NdArray dtype {name!r} has no size; refusing to decode it")
    if _unitless_time(dtype):  # numpy hands a value out as None and fails to print it
        raise ProtocolError(f"NdArray dtype {name!r} is a time without a unit (such as [s] or [ns]); refusing it")
    return dtype


def to_proto(array: np.ndarray, target: docarray_pb2.NdArrayProto) -> None:
    """Write a dense numpy array into an NdArray message."""
    array = _sendable(array)
    target.Clear()
    write_dense(array, target.dense)
    target.cls_name = "numpy"


def write_sparse(
    indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...], target: docarray_pb2.NdArrayProto
) -> None:
    """Write a COO sparse array: ``indices`` is (nnz, ndim), ``values`` is (nnz,).

    Labelled so docarray reads it back: a matrix as scipy's ``coo``, any other
    rank in tensorflow's layout (which is ours), which a Jina peer reads only
    with tensorflow installed (scipy's sparse arrays are matrices only): send
    such an array dense to a Jina without it.
    """
    indices, values = _sendable(indices, _NUMERIC_KINDS), _sendable(values, _NUMERIC_KINDS)
    if indices.ndim != 2 or indices.shape[1] != len(shape):
        raise ProtocolError(f"sparse indices must be (nnz, {len(shape)}), got {indices.shape}")
    target.Clear()
    write_dense(indices, target.sparse.indices)
    write_dense(values, target.sparse.values)
    target.sparse.shape.extend(shape)
    if len(shape) == 2:
        target.cls_name = "scipy"
        target.parameters["sparse_format"] = "coo"
    else:
        target.cls_name = "tensorflow"


def from_proto(source: docarray_pb2.NdArrayProto, budget: Optional[DenseBudget] = None) -> Optional[np.ndarray]:
    """Read an NdArray message as a dense numpy array (sparse ones are densified, charged to ``budget`` when
    given: the message's documents share one); None if empty."""
    kind = source.WhichOneof("content")
    if kind == "dense":
        return read_dense(source.dense)
    if kind == "sparse":
        indices = read_dense(source.sparse.indices)
        values = read_dense(source.sparse.values)
        shape = _shape(source.sparse.shape)
        if source.cls_name == "torch" and indices.ndim == 2:  # torch's own layout: one row per dimension
            indices = indices.T
        if not shape:
            raise ProtocolError("a sparse NdArray needs a shape of at least one dimension, got none")
        if values.ndim != 1 or indices.ndim != 2 or indices.shape != (len(values), len(shape)):
            raise ProtocolError(f"sparse NdArray indices {indices.shape} do not fit values {values.shape} of {shape}")
        if indices.dtype.kind not in "iu":
            raise ProtocolError(f"sparse NdArray indices must be integers, not {indices.dtype}")
        if values.dtype.kind not in _NUMERIC_KINDS:
            raise ProtocolError(f"sparse NdArray values must be numbers, not {values.dtype}")
        dense_bytes = math.prod(shape) * values.dtype.itemsize
        if dense_bytes > MAX_DENSE_BYTES:
            raise ProtocolError(
                f"sparse NdArray of shape {shape} would expand to {dense_bytes} bytes (limit {MAX_DENSE_BYTES})"
            )
        if budget is not None:
            budget.charge(source, dense_bytes, shape)
        try:
            dense = np.zeros(shape, dtype=values.dtype)
        except ValueError as exc:
            raise ProtocolError(f"sparse NdArray shape {shape} is not usable: {exc}") from None
        if len(values):
            if (indices < 0).any() or (indices >= np.array(shape)).any():
                raise ProtocolError(f"sparse NdArray index outside shape {shape}")
            np.add.at(dense, tuple(indices.T), values)  # a coordinate given twice sums, as scipy and torch read it
        return dense
    return None
