from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata_json: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("namespace", "documents")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, namespace: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class DocumentStatus(_message.Message):
    __slots__ = ("id", "status", "duplicate_of")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_OF_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    duplicate_of: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., duplicate_of: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("job_id", "documents")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    documents: _containers.RepeatedCompositeFieldContainer[DocumentStatus]
    def __init__(self, job_id: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[DocumentStatus, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StepYield(_message.Message):
    __slots__ = ("step", "calls", "failed_calls", "candidates", "kept", "dropped", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILED_CALLS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: str
    calls: int
    failed_calls: int
    candidates: int
    kept: int
    dropped: int
    seconds: float
    def __init__(self, step: _Optional[str] = ..., calls: _Optional[int] = ..., failed_calls: _Optional[int] = ..., candidates: _Optional[int] = ..., kept: _Optional[int] = ..., dropped: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "namespace", "status", "stage", "done", "total", "errors", "kind", "document_ids", "step_yields", "model_version", "created_at", "started_at", "finished_at", "attempts", "training_examples", "train_loss", "replayed_examples", "superseded_adapters")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_YIELDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    namespace: str
    status: str
    stage: str
    done: int
    total: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    kind: str
    document_ids: _containers.RepeatedScalarFieldContainer[str]
    step_yields: _containers.RepeatedCompositeFieldContainer[StepYield]
    model_version: str
    created_at: float
    started_at: float
    finished_at: float
    attempts: int
    training_examples: int
    train_loss: float
    replayed_examples: int
    superseded_adapters: int
    def __init__(self, job_id: _Optional[str] = ..., namespace: _Optional[str] = ..., status: _Optional[str] = ..., stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ..., kind: _Optional[str] = ..., document_ids: _Optional[_Iterable[str]] = ..., step_yields: _Optional[_Iterable[_Union[StepYield, _Mapping]]] = ..., model_version: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., attempts: _Optional[int] = ..., training_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., replayed_examples: _Optional[int] = ..., superseded_adapters: _Optional[int] = ...) -> None: ...

class GetNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "created_at", "adapters", "ties_density", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    TIES_DENSITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: float
    adapters: _containers.RepeatedScalarFieldContainer[str]
    ties_density: float
    reason: str
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[float] = ..., adapters: _Optional[_Iterable[str]] = ..., ties_density: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("namespace", "documents", "chunks", "reflections", "jobs", "current_version", "versions", "exists")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    REFLECTIONS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    documents: int
    chunks: int
    reflections: int
    jobs: int
    current_version: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    exists: bool
    def __init__(self, namespace: _Optional[str] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., reflections: _Optional[int] = ..., jobs: _Optional[int] = ..., current_version: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., exists: _Optional[bool] = ...) -> None: ...

class DeleteDocumentRequest(_message.Message):
    __slots__ = ("namespace", "document_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    document_id: str
    def __init__(self, namespace: _Optional[str] = ..., document_id: _Optional[str] = ...) -> None: ...

class DeleteDocumentResponse(_message.Message):
    __slots__ = ("deleted", "job_id", "method", "affected_jobs", "detail")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AFFECTED_JOBS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    job_id: str
    method: str
    affected_jobs: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    def __init__(self, deleted: _Optional[bool] = ..., job_id: _Optional[str] = ..., method: _Optional[str] = ..., affected_jobs: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ...) -> None: ...

class DeleteNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class DeleteNamespaceResponse(_message.Message):
    __slots__ = ("exists", "documents", "job_id", "detail")
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    documents: int
    job_id: str
    detail: str
    def __init__(self, exists: _Optional[bool] = ..., documents: _Optional[int] = ..., job_id: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("namespace", "version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    version: str
    def __init__(self, namespace: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("namespace", "question", "max_tokens")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    question: str
    max_tokens: int
    def __init__(self, namespace: _Optional[str] = ..., question: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("answer", "sources", "model_version", "knows", "seconds", "cached")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    answer: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    knows: bool
    seconds: float
    cached: bool
    def __init__(self, answer: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., knows: _Optional[bool] = ..., seconds: _Optional[float] = ..., cached: _Optional[bool] = ...) -> None: ...

class ListNamespacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NamespaceSummary(_message.Message):
    __slots__ = ("namespace", "documents", "current_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    documents: int
    current_version: str
    def __init__(self, namespace: _Optional[str] = ..., documents: _Optional[int] = ..., current_version: _Optional[str] = ...) -> None: ...

class ListNamespacesResponse(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceSummary]
    def __init__(self, namespaces: _Optional[_Iterable[_Union[NamespaceSummary, _Mapping]]] = ...) -> None: ...

class StoredDocument(_message.Message):
    __slots__ = ("id", "metadata_json", "content_hash", "characters", "chunks", "job_id", "learned", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEARNED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata_json: str
    content_hash: str
    characters: int
    chunks: int
    job_id: str
    learned: bool
    text: str
    def __init__(self, id: _Optional[str] = ..., metadata_json: _Optional[str] = ..., content_hash: _Optional[str] = ..., characters: _Optional[int] = ..., chunks: _Optional[int] = ..., job_id: _Optional[str] = ..., learned: _Optional[bool] = ..., text: _Optional[str] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("namespace", "document_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    document_id: str
    def __init__(self, namespace: _Optional[str] = ..., document_id: _Optional[str] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("namespace", "limit", "after")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    limit: int
    after: str
    def __init__(self, namespace: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_after")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[StoredDocument]
    next_after: str
    def __init__(self, documents: _Optional[_Iterable[_Union[StoredDocument, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...
