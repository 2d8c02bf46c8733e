from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODE_FORMAT_UNSPECIFIED: _ClassVar[DecodeFormat]
    DECODE_FORMAT_MP4: _ClassVar[DecodeFormat]
    DECODE_FORMAT_FRAMES: _ClassVar[DecodeFormat]
DECODE_FORMAT_UNSPECIFIED: DecodeFormat
DECODE_FORMAT_MP4: DecodeFormat
DECODE_FORMAT_FRAMES: DecodeFormat

class EncodeOptions(_message.Message):
    __slots__ = ("model", "sample", "seed", "dtype", "moments", "size_bytes", "resize", "crop", "bucket", "start_frame", "start_s", "num_frames", "max_frames", "stride", "fps", "frames")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    sample: bool
    seed: int
    dtype: str
    moments: bool
    size_bytes: int
    resize: str
    crop: str
    bucket: _containers.RepeatedScalarFieldContainer[str]
    start_frame: int
    start_s: str
    num_frames: int
    max_frames: int
    stride: int
    fps: str
    frames: TensorSpec
    def __init__(self, model: _Optional[str] = ..., sample: _Optional[bool] = ..., seed: _Optional[int] = ..., dtype: _Optional[str] = ..., moments: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., resize: _Optional[str] = ..., crop: _Optional[str] = ..., bucket: _Optional[_Iterable[str]] = ..., start_frame: _Optional[int] = ..., start_s: _Optional[str] = ..., num_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., stride: _Optional[int] = ..., fps: _Optional[str] = ..., frames: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype", "fps")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    fps: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., fps: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: EncodeOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class EncodeProgress(_message.Message):
    __slots__ = ("frames_done",)
    FRAMES_DONE_FIELD_NUMBER: _ClassVar[int]
    frames_done: int
    def __init__(self, frames_done: _Optional[int] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("info", "cache_hit", "size_bytes")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    info: LatentInfo
    cache_hit: bool
    size_bytes: int
    def __init__(self, info: _Optional[_Union[LatentInfo, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("progress", "result", "chunk")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    progress: EncodeProgress
    result: EncodeResult
    chunk: bytes
    def __init__(self, progress: _Optional[_Union[EncodeProgress, _Mapping]] = ..., result: _Optional[_Union[EncodeResult, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class EncodeUnaryRequest(_message.Message):
    __slots__ = ("options", "video")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    options: EncodeOptions
    video: bytes
    def __init__(self, options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., video: _Optional[bytes] = ...) -> None: ...

class EncodeUnaryResponse(_message.Message):
    __slots__ = ("info", "cache_hit", "latent")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    info: LatentInfo
    cache_hit: bool
    latent: bytes
    def __init__(self, info: _Optional[_Union[LatentInfo, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., latent: _Optional[bytes] = ...) -> None: ...

class LatentInfo(_message.Message):
    __slots__ = ("model", "num_frames", "width", "height", "fps_numerator", "fps_denominator", "latent_shape", "dtype", "content_sha256", "metadata", "batch")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_NUMERATOR_FIELD_NUMBER: _ClassVar[int]
    FPS_DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_frames: int
    width: int
    height: int
    fps_numerator: int
    fps_denominator: int
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    content_sha256: str
    metadata: _containers.ScalarMap[str, str]
    batch: int
    def __init__(self, model: _Optional[str] = ..., num_frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps_numerator: _Optional[int] = ..., fps_denominator: _Optional[int] = ..., latent_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., content_sha256: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., batch: _Optional[int] = ...) -> None: ...

class DecodeOptions(_message.Message):
    __slots__ = ("format", "crf", "size_bytes", "model", "num_frames", "height", "width", "fps", "latent_space", "tensor", "frames_dtype")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CRF_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    LATENT_SPACE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    format: DecodeFormat
    crf: int
    size_bytes: int
    model: str
    num_frames: int
    height: int
    width: int
    fps: str
    latent_space: str
    tensor: TensorSpec
    frames_dtype: str
    def __init__(self, format: _Optional[_Union[DecodeFormat, str]] = ..., crf: _Optional[int] = ..., size_bytes: _Optional[int] = ..., model: _Optional[str] = ..., num_frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., fps: _Optional[str] = ..., latent_space: _Optional[str] = ..., tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., frames_dtype: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: DecodeOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[DecodeOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: LatentInfo
    chunk: bytes
    def __init__(self, info: _Optional[_Union[LatentInfo, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "z_dim", "dim", "scale_factor", "shift_factor", "weights_sha256", "trained", "source", "num_params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    Z_DIM_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float
    weights_sha256: str
    trained: bool
    source: str
    num_params: int
    def __init__(self, name: _Optional[str] = ..., z_dim: _Optional[int] = ..., dim: _Optional[int] = ..., scale_factor: _Optional[float] = ..., shift_factor: _Optional[float] = ..., weights_sha256: _Optional[str] = ..., trained: _Optional[bool] = ..., source: _Optional[str] = ..., num_params: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("default_model", "models", "encode_precision")
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_PRECISION_FIELD_NUMBER: _ClassVar[int]
    default_model: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    encode_precision: str
    def __init__(self, default_model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., encode_precision: _Optional[str] = ...) -> None: ...
