"""Prepare a runnable copy of a committed Triton model repository (torch-free).

The committed ``model_repository/`` stays as the CPU tests use it, free of machine paths.
:func:`prepare_repository` copies it and rewrites each copied ``config.pbtxt`` through
Triton's own ``ModelConfig`` protobuf message (shipped by tritonclient) with
``google.protobuf.text_format``, so nothing here tokenises protobuf text by hand:

* model-config ``parameters`` the ivvae python models read (``ivvae.triton.contract``):
  ``ARTIFACT_DIR``, ``ARTIFACT_FORMAT``, ``PRECISION``, ``SEQUENCE_TTL_S``, ``NUM_THREADS``,
  ``MODEL_INFO`` (from the export manifest in ``ARTIFACT_DIR`` when not given), and
  ``EXECUTION_ENV_PATH`` (the venv the python-backend stub activates);
* ``SEQUENCE_TTL_S`` also sets Triton's ``max_sequence_idle_microseconds``, so that Triton's
  sequence slot and the model's state expire together;
* optionally the instance group (``KIND_GPU`` in production).

Used by ``docker/triton_prepare.py`` (the container), ``ivvae triton-serve`` and the local
stack.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.artifacts import FORMATS, ArtifactError, read_manifest
from ..core.names import PRECISIONS
from ..triton import contract as c

log = logging.getLogger("ivvae.devtools.repository")

CONFIG_NAME = "config.pbtxt"
# Model-config parameter read by the python backend: the stub runs `source <dir>/bin/activate`.
EXECUTION_ENV_PATH = "EXECUTION_ENV_PATH"
ALL_MODELS = "*"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
# A typo in a parameter name fails here, not silently in Triton.
KNOWN_PARAMETERS = (c.ARTIFACT_DIR, c.ARTIFACT_FORMAT, c.PRECISION, c.SEQUENCE_TTL_S,
                    c.NUM_THREADS, c.MODEL_INFO, EXECUTION_ENV_PATH)
# Written into a prepared repository so that preparing it again may safely replace it.
PREPARED_MARKER = ".ivvae-prepared-repository"


class PrepareError(ValueError):
    """A preparation problem the operator must fix; the message says what."""


def check_parameters(values: Mapping[str, str], *, known_names: bool = False) -> None:
    """Refuse malformed values of the ivvae parameters and, with ``known_names``, any other
    name (``PrepareError`` naming them)."""
    unknown = sorted(set(values) - set(KNOWN_PARAMETERS))
    if known_names and unknown:
        raise PrepareError(f"unknown parameters {unknown} (known: {list(KNOWN_PARAMETERS)})")
    if values.get(c.ARTIFACT_FORMAT, FORMATS[0]) not in FORMATS:
        raise PrepareError(f"{c.ARTIFACT_FORMAT} must be one of {list(FORMATS)}")
    if values.get(c.PRECISION, PRECISIONS[0]) not in PRECISIONS:
        raise PrepareError(f"{c.PRECISION} must be one of {list(PRECISIONS)}")
    for key, positive in ((c.SEQUENCE_TTL_S, float), (c.NUM_THREADS, int)):
        value = values.get(key)
        if value:
            try:
                if positive(value) <= 0:
                    raise ValueError
            except ValueError:
                raise PrepareError(f"{key} must be a positive number, got {value!r}") from None


def _model_config_module() -> Any:
    """tritonclient's generated ``model_config_pb2`` (Triton's ModelConfig message).

    Loaded from its file when it is where tritonclient keeps it: importing it through
    ``tritonclient.grpc`` first runs that package's ``__init__``, which pulls in grpcio and
    the whole client for one message class (most of a container start-up's time).
    """
    spec = importlib.util.find_spec("tritonclient")
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(locations[0]) / "grpc" / "model_config_pb2.py" if locations else None
    if path is None or not path.is_file():
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    name = "_ivvae_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise PrepareError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def rewrite_config(text: str, parameters: Mapping[str, str], *,
                   instance_kind: str | None = None, instance_count: int | None = None) -> str:
    """``text`` (a config.pbtxt) with ``parameters`` set (others kept) and, when asked, one
    instance group replacing the committed ones."""
    from google.protobuf import text_format

    model_config_pb2 = _model_config_module()
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise PrepareError(f"cannot parse model config: {exc}") from exc
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    ttl = parameters.get(c.SEQUENCE_TTL_S)
    if ttl and config.HasField("sequence_batching"):
        config.sequence_batching.max_sequence_idle_microseconds = round(float(ttl) * 1e6)
    if instance_kind is not None or instance_count is not None:
        if instance_kind is not None and instance_kind not in INSTANCE_KINDS:
            raise PrepareError(f"instance kind must be one of {INSTANCE_KINDS}")
        if instance_count is not None and instance_count < 1:
            raise PrepareError("instance count must be >= 1")
        # What the caller leaves out is kept from the first committed group (count 0 in a
        # config means Triton's default of 1).
        kinds = model_config_pb2.ModelInstanceGroup.Kind
        first = config.instance_group[0] if config.instance_group else None
        kind_name = instance_kind or (kinds.Name(first.kind) if first else "KIND_AUTO")
        count = instance_count or (first.count if first and first.count else 1)
        del config.instance_group[:]
        config.instance_group.add(kind=kinds.Value(kind_name), count=count)
    return str(text_format.MessageToString(config))


def model_info(artifact_dir: str | Path, artifact_format: str | None = None) -> str:
    """The ``MODEL_INFO`` parameter for the export in ``artifact_dir``."""
    try:
        manifest = read_manifest(artifact_dir)
        value = manifest.model_info.to_json()
    except (ArtifactError, ValueError) as exc:
        raise PrepareError(f"cannot read the export in {artifact_dir} ({exc}); export with "
                           "`ivvae export`") from None
    if artifact_format and manifest.format != artifact_format:
        raise PrepareError(f"{c.ARTIFACT_FORMAT}={artifact_format} but {artifact_dir} holds "
                           f"{manifest.format} artifacts")
    return value


def prepare_repository(
    src: str | Path,
    dst: str | Path,
    *,
    parameters: Mapping[str, Mapping[str, str]] | None = None,
    env_path: str | Path | None = sys.prefix,
    instance_kind: str | None = None,
    instance_count: int | None = None,
) -> Path:
    """Copy the repository ``src`` to ``dst`` and rewrite every model's ``config.pbtxt``.

    ``parameters[<model name>]`` and ``parameters["*"]`` (all models; a model's own entry
    wins) are set. With ``ARTIFACT_DIR`` and no ``MODEL_INFO``, the export manifest there
    gives ``MODEL_INFO``. ``env_path`` (a venv with ``bin/activate``; default: the running
    interpreter's; ``None``: the stub's own Python, as in the container) becomes
    ``EXECUTION_ENV_PATH``. ``dst`` must be absent, empty, or prepared earlier (it is then
    replaced). Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise PrepareError(f"{dst} lies inside the repository it would copy, {src}")
    models = sorted(p.parent.name for p in src.glob(f"*/{CONFIG_NAME}"))
    if not models:
        raise PrepareError(f"no */{CONFIG_NAME} under model repository {src}")
    parameters = parameters or {}
    unknown = set(parameters) - set(models) - {ALL_MODELS}
    if unknown:
        raise PrepareError(f"parameters for unknown models {sorted(unknown)}; models: {models}")
    common: dict[str, str] = {}
    if env_path is not None:
        common[EXECUTION_ENV_PATH] = str(execution_env(Path(env_path)))
    common.update(parameters.get(ALL_MODELS, {}))
    values_of = {m: {**common, **parameters.get(m, {})} for m in models}
    for values in values_of.values():
        check_parameters(values)
        if values.get(c.ARTIFACT_DIR) and not values.get(c.MODEL_INFO):
            values[c.MODEL_INFO] = model_info(values[c.ARTIFACT_DIR],
                                              values.get(c.ARTIFACT_FORMAT))
    if dst.exists() and any(dst.iterdir()):
        if not (dst / PREPARED_MARKER).exists():
            raise PrepareError(f"{dst} is not empty and was not prepared by ivvae")
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    (dst / PREPARED_MARKER).write_text(f"prepared from {src.resolve()}\n")
    for model, values in values_of.items():
        config = dst / model / CONFIG_NAME
        try:
            config.write_text(rewrite_config(config.read_text(), values,
                                             instance_kind=instance_kind,
                                             instance_count=instance_count))
        except PrepareError as exc:
            raise PrepareError(f"{src / model / CONFIG_NAME}: {exc}") from exc
    return dst


def execution_env(env: Path) -> Path:
    """``env`` checked as the venv the stub activates; for the running interpreter's own venv
    also numpy < 2 and a libpython link (see :func:`_link_libpython`)."""
    env = env.absolute()
    if not (env / "bin" / "activate").is_file():
        raise PrepareError(
            f"{env} is not a virtual environment (no bin/activate); the python-backend stub "
            "activates EXECUTION_ENV_PATH before importing the model"
        )
    if env.resolve() == Path(sys.prefix).resolve():
        _check_numpy_below_2()
        _link_libpython(env)
    return env


def _check_numpy_below_2() -> None:
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return  # a model that needs numpy will say so at load time
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {version} in {sys.prefix}: the Triton 2.51 python-backend stub corrupts "
            "input tensors with numpy 2; install numpy<2"
        )


def _link_libpython(env: Path) -> None:
    """``<venv>/lib/libpython3.X.so.1.0`` -> this Python's, so that the stub does not mix the
    system's libpython with this Python's standard library."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname:
        log.warning("cannot tell where libpython is; the stub may load the system's libpython")
        return
    target = Path(libdir) / soname
    link = env / "lib" / soname
    if not target.exists():
        log.warning("%s does not exist; the stub may load the system's libpython", target)
        return
    if link.exists() and (not link.is_symlink() or link.resolve() == target.resolve()):
        return  # the real library lives here, or the link is already right
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{soname}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
