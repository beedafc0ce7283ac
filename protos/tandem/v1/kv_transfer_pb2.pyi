from protos.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvContractVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_CONTRACT_VERSION_UNSPECIFIED: _ClassVar[KvContractVersion]
    KV_CONTRACT_VERSION_1: _ClassVar[KvContractVersion]

class TransferStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATUS_UNSPECIFIED: _ClassVar[TransferStatus]
    TRANSFER_STATUS_COMPLETE: _ClassVar[TransferStatus]
    TRANSFER_STATUS_FAILED: _ClassVar[TransferStatus]
KV_CONTRACT_VERSION_UNSPECIFIED: KvContractVersion
KV_CONTRACT_VERSION_1: KvContractVersion
TRANSFER_STATUS_UNSPECIFIED: TransferStatus
TRANSFER_STATUS_COMPLETE: TransferStatus
TRANSFER_STATUS_FAILED: TransferStatus

class KvLayout(_message.Message):
    __slots__ = ("dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    def __init__(self, dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ...) -> None: ...

class KvPushMessage(_message.Message):
    __slots__ = ("begin", "blocks", "complete", "abort", "first_token")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    begin: TransferBegin
    blocks: KvBlockBatch
    complete: TransferComplete
    abort: TransferAbort
    first_token: FirstTokenEarly
    def __init__(self, begin: _Optional[_Union[TransferBegin, _Mapping]] = ..., blocks: _Optional[_Union[KvBlockBatch, _Mapping]] = ..., complete: _Optional[_Union[TransferComplete, _Mapping]] = ..., abort: _Optional[_Union[TransferAbort, _Mapping]] = ..., first_token: _Optional[_Union[FirstTokenEarly, _Mapping]] = ...) -> None: ...

class FirstTokenEarly(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    def __init__(self, token_id: _Optional[int] = ...) -> None: ...

class TransferBegin(_message.Message):
    __slots__ = ("version", "transfer_id", "layout", "num_tokens", "source_instance_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    version: KvContractVersion
    transfer_id: str
    layout: KvLayout
    num_tokens: int
    source_instance_id: str
    def __init__(self, version: _Optional[_Union[KvContractVersion, str]] = ..., transfer_id: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., num_tokens: _Optional[int] = ..., source_instance_id: _Optional[str] = ...) -> None: ...

class KvBlockSegment(_message.Message):
    __slots__ = ("block_index", "layer_start", "num_layers", "data")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    layer_start: int
    num_layers: int
    data: bytes
    def __init__(self, block_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., num_layers: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class KvBlockBatch(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[KvBlockSegment]
    def __init__(self, segments: _Optional[_Iterable[_Union[KvBlockSegment, _Mapping]]] = ...) -> None: ...

class TransferComplete(_message.Message):
    __slots__ = ("first_token_id", "num_segments", "first_token_logprobs", "prompt_logprobs")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    num_segments: int
    first_token_logprobs: _common_pb2.TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, first_token_id: _Optional[int] = ..., num_segments: _Optional[int] = ..., first_token_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class TransferAbort(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class KvPushResult(_message.Message):
    __slots__ = ("status", "bytes_received", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: TransferStatus
    bytes_received: int
    message: str
    def __init__(self, status: _Optional[_Union[TransferStatus, str]] = ..., bytes_received: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
