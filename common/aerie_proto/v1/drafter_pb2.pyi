from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorChunk(_message.Message):
    __slots__ = ("shape", "dtype", "data", "more")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    more: bool
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., more: _Optional[bool] = ...) -> None: ...

class TreeShape(_message.Message):
    __slots__ = ("depth", "top_k", "total_tokens", "context_ngram")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_NGRAM_FIELD_NUMBER: _ClassVar[int]
    depth: int
    top_k: int
    total_tokens: int
    context_ngram: bool
    def __init__(self, depth: _Optional[int] = ..., top_k: _Optional[int] = ..., total_tokens: _Optional[int] = ..., context_ngram: _Optional[bool] = ...) -> None: ...

class DraftStart(_message.Message):
    __slots__ = ("request_id", "token_ids", "tree", "hidden_states")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tree: TreeShape
    hidden_states: TensorChunk
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tree: _Optional[_Union[TreeShape, _Mapping]] = ..., hidden_states: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class DraftExtend(_message.Message):
    __slots__ = ("accepted_token_ids", "hidden_states")
    ACCEPTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    accepted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden_states: TensorChunk
    def __init__(self, accepted_token_ids: _Optional[_Iterable[int]] = ..., hidden_states: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("start", "extend", "hidden_states_part")
    START_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_PART_FIELD_NUMBER: _ClassVar[int]
    start: DraftStart
    extend: DraftExtend
    hidden_states_part: TensorChunk
    def __init__(self, start: _Optional[_Union[DraftStart, _Mapping]] = ..., extend: _Optional[_Union[DraftExtend, _Mapping]] = ..., hidden_states_part: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class DraftTree(_message.Message):
    __slots__ = ("token_ids", "parents", "scores")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("tree", "draft_seconds")
    TREE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tree: DraftTree
    draft_seconds: float
    def __init__(self, tree: _Optional[_Union[DraftTree, _Mapping]] = ..., draft_seconds: _Optional[float] = ...) -> None: ...

class DrafterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrafterInfo(_message.Message):
    __slots__ = ("capture_layer_ids", "eagle_version", "target_hidden_size", "vocab_size", "draft_vocab_size", "default_tree", "head_path", "live_sessions", "max_sessions", "sessions_total")
    CAPTURE_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    EAGLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TREE_FIELD_NUMBER: _ClassVar[int]
    HEAD_PATH_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    capture_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    eagle_version: str
    target_hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    default_tree: TreeShape
    head_path: str
    live_sessions: int
    max_sessions: int
    sessions_total: int
    def __init__(self, capture_layer_ids: _Optional[_Iterable[int]] = ..., eagle_version: _Optional[str] = ..., target_hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., draft_vocab_size: _Optional[int] = ..., default_tree: _Optional[_Union[TreeShape, _Mapping]] = ..., head_path: _Optional[str] = ..., live_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., sessions_total: _Optional[int] = ...) -> None: ...
