import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from shardnet.protocol.proto import docarray_pb2 as _docarray_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExceptionProto(_message.Message):
    __slots__ = ("name", "args", "stacks", "executor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    STACKS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    args: _containers.RepeatedScalarFieldContainer[str]
    stacks: _containers.RepeatedScalarFieldContainer[str]
    executor: str
    def __init__(self, name: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., stacks: _Optional[_Iterable[str]] = ..., executor: _Optional[str] = ...) -> None: ...

class StatusProto(_message.Message):
    __slots__ = ("code", "description", "exception")
    class StatusCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SUCCESS: _ClassVar[StatusProto.StatusCode]
        ERROR: _ClassVar[StatusProto.StatusCode]
    SUCCESS: StatusProto.StatusCode
    ERROR: StatusProto.StatusCode
    CODE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_FIELD_NUMBER: _ClassVar[int]
    code: StatusProto.StatusCode
    description: str
    exception: ExceptionProto
    def __init__(self, code: _Optional[_Union[StatusProto.StatusCode, str]] = ..., description: _Optional[str] = ..., exception: _Optional[_Union[ExceptionProto, _Mapping]] = ...) -> None: ...

class HeaderProto(_message.Message):
    __slots__ = ("request_id", "status", "exec_endpoint", "target_executor", "timeout")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXEC_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: StatusProto
    exec_endpoint: str
    target_executor: str
    timeout: int
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[StatusProto, _Mapping]] = ..., exec_endpoint: _Optional[str] = ..., target_executor: _Optional[str] = ..., timeout: _Optional[int] = ...) -> None: ...

class RouteProto(_message.Message):
    __slots__ = ("executor", "start_time", "end_time", "status")
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    executor: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    status: StatusProto
    def __init__(self, executor: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[StatusProto, _Mapping]] = ...) -> None: ...

class DataContentProto(_message.Message):
    __slots__ = ("docs", "docs_bytes")
    DOCS_FIELD_NUMBER: _ClassVar[int]
    DOCS_BYTES_FIELD_NUMBER: _ClassVar[int]
    docs: _docarray_pb2.DocumentArrayProto
    docs_bytes: bytes
    def __init__(self, docs: _Optional[_Union[_docarray_pb2.DocumentArrayProto, _Mapping]] = ..., docs_bytes: _Optional[bytes] = ...) -> None: ...

class DataRequestProto(_message.Message):
    __slots__ = ("header", "parameters", "routes", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: HeaderProto
    parameters: _struct_pb2.Struct
    routes: _containers.RepeatedCompositeFieldContainer[RouteProto]
    data: DataContentProto
    def __init__(self, header: _Optional[_Union[HeaderProto, _Mapping]] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., routes: _Optional[_Iterable[_Union[RouteProto, _Mapping]]] = ..., data: _Optional[_Union[DataContentProto, _Mapping]] = ...) -> None: ...

class DataRequestEnvelope(_message.Message):
    __slots__ = ("header", "parameters", "routes", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: HeaderProto
    parameters: _struct_pb2.Struct
    routes: _containers.RepeatedCompositeFieldContainer[RouteProto]
    data: bytes
    def __init__(self, header: _Optional[_Union[HeaderProto, _Mapping]] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., routes: _Optional[_Iterable[_Union[RouteProto, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DataRequestListProto(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[DataRequestProto]
    def __init__(self, requests: _Optional[_Iterable[_Union[DataRequestProto, _Mapping]]] = ...) -> None: ...

class DataRequestListEnvelope(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, requests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RelatedEntity(_message.Message):
    __slots__ = ("id", "address", "port", "shard_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    port: int
    shard_id: int
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., shard_id: _Optional[int] = ...) -> None: ...

class ControlRequestProto(_message.Message):
    __slots__ = ("header", "command", "related_entities")
    class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS: _ClassVar[ControlRequestProto.Command]
        ACTIVATE: _ClassVar[ControlRequestProto.Command]
        DEACTIVATE: _ClassVar[ControlRequestProto.Command]
    STATUS: ControlRequestProto.Command
    ACTIVATE: ControlRequestProto.Command
    DEACTIVATE: ControlRequestProto.Command
    HEADER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    RELATED_ENTITIES_FIELD_NUMBER: _ClassVar[int]
    header: HeaderProto
    command: ControlRequestProto.Command
    related_entities: _containers.RepeatedCompositeFieldContainer[RelatedEntity]
    def __init__(self, header: _Optional[_Union[HeaderProto, _Mapping]] = ..., command: _Optional[_Union[ControlRequestProto.Command, str]] = ..., related_entities: _Optional[_Iterable[_Union[RelatedEntity, _Mapping]]] = ...) -> None: ...

class EndpointsProto(_message.Message):
    __slots__ = ("endpoints", "write_endpoints", "schemas")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    WRITE_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SCHEMAS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    write_endpoints: _containers.RepeatedScalarFieldContainer[str]
    schemas: _struct_pb2.Struct
    def __init__(self, endpoints: _Optional[_Iterable[str]] = ..., write_endpoints: _Optional[_Iterable[str]] = ..., schemas: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
