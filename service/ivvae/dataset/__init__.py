"""``ivvae encode-dataset``: precompute the latents of a whole dataset, exactly resumable.

    ivvae encode-dataset clips/ latents/                        # in-process model
    ivvae encode-dataset s3://raw/clips/ s3://lat/v1/ --format webdataset --shard 3/16
    ivvae encode-dataset clips.txt out/ --server grpc://encoder:50051 --concurrency 8

Sources (``SRC``, local or any fsspec URL): a folder or URL prefix (searched recursively for
video and image files; in a local folder, symbolic links are followed), a glob
(``s3://b/clips/*/*.mp4``), or a list file (one path or URL a line, as written, spaces
included; relative ones are relative to the list's folder; blank lines and lines starting
with ``#`` are skipped). A list may also be a table, as training tools keep their
datasets: ``.csv`` (with a header), ``.jsonl`` or ``.json`` (an array of objects), one row
per clip. Its clip column is ``--path-column`` or the first of ``PATH_COLUMNS``
(``media_path``, ``video_path``, ``video``, ``path``, ...); its caption, ``--caption-column``
or the first of ``CAPTION_COLUMNS`` (``caption``, ``text``, ``prompt``, ``cap``), becomes the
clip's ``.txt`` sidecar and the whole row its ``.json`` sidecar (in place of files beside
the clip with those suffixes). ``--option-column OPTION[=COLUMN]`` lets each row set a
preprocessing option for its clip (a window: ``start_s`` or ``start_frame``, ``num_frames``
or ``max_frames``; or any other), over the job's option of that name and its alternative
(``start_s`` for ``start_frame``, ``num_frames`` for ``max_frames``, ``fps`` for
``stride``); an empty cell sets none. Such a clip is named ``<path>#<its options>``
(``long.mp4#start_s=12,num_frames=49``), so one file in several rows (the spans of a
scene-cut or captioned long video) is a clip per row (a remote file that several clips
of a run read is fetched once: ``Copies``). A source that holds no clip at all is
refused (exit 2): it is a mistyped prefix, not a job. Files next to a clip with its stem
and another suffix (``clip.txt``, ``clip.json``) are its sidecars: they go into webdataset
and parquet samples as they are. A changed sidecar or caption makes its clip's sample new.

Outputs (``OUT``, a folder or URL prefix), ``--format``:

* ``files``: ``OUT/<source>.latent.safetensors``, one latent file per clip;
* ``webdataset``: ``OUT/shards/*.tar``; sample ``<key>`` (the source name with ``.`` -> ``_``)
  holds ``<key>.latent.safetensors``, ``<key>.ivvae.json`` (its manifest record and latent
  metadata) and each sidecar ``<key>.<suffix>``;
* ``parquet``: ``OUT/shards/*.parquet``, one row per clip: ``latent`` (the raw tensor bytes,
  C order), ``shape``, ``dtype``, every latent metadata field as a column, ``sidecars``.

``OUT/manifest.jsonl`` has one line per clip of the job, whatever the number of reruns and
workers: ``source``, ``key``, ``status`` (``ok``, ``error`` or ``pending``: not yet done by
any worker), ``part`` and ``member`` (where the latent is: a file, or a shard and the tar
sample key / parquet row), ``shape``, ``dtype``, ``frames``, ``bytes``, ``latent_sha256``,
``file`` (``files`` format: which publish of the latent file it is), ``error``, ``detail``.
It is rewritten whole when a worker finishes (or is stopped); ``ivvae.data`` reads it.

Encoders. Without ``--server`` the model runs in this process (``EncoderSpec``: weights,
device, precision); concurrent clips' steps are not batched together, so each latent is bit
for bit what encoding that clip alone gives. The preprocessing options
(``ivvae.video.preprocess``: ``--resize``, ``--bucket``, ...) apply on either path.

Exact resume. The job is keyed by everything that decides its output (``JobConfig``): the
format, the preprocessing and encode options, the model and its weights hash. A clip's key
adds the source's identity (object stores: version or ETag, and size; local files: the
content's sha256) and its sidecars'. A rerun with the same job key skips every clip whose
key has a published output and encodes the rest (never done, failed, interrupted, or a
source that changed since); a different job key is refused (``--new-version`` writes it to
``OUT/versions/<key>/`` instead), so outputs are never mixed. A re-encoded clip's old
sample stays in its old shard (a run never rewrites a tar or parquet file): the manifest,
and so ``ivvae.data``, names only the current one, while a reader that globs the shards
itself sees both until ``ivvae compact-dataset`` (``ivvae.compact``) rewrites that shard.

Crash safety. Outputs are published whole (``ivvae.storage``): a latent file, then a shard,
then the part's record file ``OUT/.ivvae/parts/<part>.jsonl``, which is what makes its
clips count as done. A shard published by a run killed before its record file is removed
at the next start of the same ``--shard`` (or of any unsharded run), so no clip is ever in
two shards; temporary files of killed runs are removed too. A lock file keeps two runs of
one ``--shard`` from writing into one local ``OUT`` at once (object stores cannot lock:
run each shard once, as a Kubernetes Indexed Job with ``podReplacementPolicy: Failed``
does; two at once each remove the other's shard whose record is not yet published as a
killed run's leftover, and its clips are encoded again by the next run).

``--shard i/N`` takes the clips whose name hashes to ``i`` modulo ``N``: N workers, started
anywhere and in any order, together cover the dataset exactly once. Each publishes its
listing of its share (``OUT/.ivvae/listings/``); the manifest, whoever writes it, names each
clip as its worker listed it (``write_manifest``).

Exit status: 0 when every clip of this worker is done, 1 when some failed (see the
manifest), 2 when the run could not start, or could not go on (its output failed: a full
disk; a clip's read got no answer and its store none to a check either; with
``--server``, the service is down, a clip ran out of time and the service does not answer
a liveness check either, or it served another model, weights or precision than at the
start; the summary is printed if it had started), 130 when interrupted.

The package, one module per part of that story, each importing only those above it:

* ``job``: what decides a job's output (``JobConfig``, its key), the output's layout, the
  error that stops a run;
* ``sources``: listing the clips (folders, globs, list files and tables, a row's own options)
  and each clip's name, identity and key;
* ``encoders``: the two ways a clip is encoded, in this process or through a service;
* ``parts``: what one worker publishes at a time (shards and their record files);
* ``state``: what earlier runs published, the share listings and the manifest, the job
  file and the locks;
* ``clips``: fetching one clip and encoding it, and telling a changed source or a dead
  store from a bad clip;
* ``run``: one worker's run, start to manifest;
* ``command``: the ``encode-dataset`` command line.
* ``windows``: ``ivvae windows``, long clips cut into fixed-length windows, a table of them
  that ``encode-dataset`` reads.

The compaction (``ivvae.compact``) and the Ray engine (``ivvae.ray``) build on these.
"""

# Every public name of the parts that were one module (all but ``windows``), importable from
# the package as from that module (``from ivvae.dataset import JobConfig``); a script needs
# ``encode_dataset``, ``EncoderSpec``, ``Job`` and ``Summary`` (``run_job`` with an encoder
# of its own).
from .clips import SOURCE_CHANGED, SPOOL_PREFIX, Copies, encode_clip, fetch_clip, read_sidecars
from .command import Engine, add_arguments, job_from_args, main
from .encoders import ClipEncoder, Encoded, EncoderSpec, LocalEncoder, ServiceEncoder
from .job import (
    COMPACT_PREFIX,
    COMPACTING_NAME,
    FORMATS,
    JOB_NAME,
    JOB_SCHEMA,
    LATENT_SUFFIX,
    LISTINGS_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    PARTS_DIR,
    RECORD_SUFFIX,
    REPLACES,
    SHARD_CLIPS,
    SHARD_MB,
    SHARD_SUFFIX,
    SHARDS_DIR,
    STATE_DIR,
    VERSIONS_DIR,
    ClipOptions,
    DatasetError,
    Format,
    JobConfig,
    ModelIdentity,
    differences,
    jsonl,
)
from .parts import PARQUET_META_COLUMNS, PartWriter, error_record, ok_record, parquet_schema
from .run import Job, Plan, Progress, Summary, encode_dataset, plan, run_job
from .sources import (
    CAPTION_COLUMNS,
    PATH_COLUMNS,
    TABLE_SUFFIXES,
    Columns,
    Source,
    check_unique,
    clip_key,
    collect,
    suffix_of,
    under,
    with_row_options,
    worker_of,
)
from .state import (
    Listing,
    State,
    load_state,
    open_output,
    output_locks,
    publish_manifest,
    publish_share,
    read_job,
    remove_orphans,
    write_manifest,
)

__all__ = [
    "CAPTION_COLUMNS",
    "COMPACTING_NAME",
    "COMPACT_PREFIX",
    "FORMATS",
    "JOB_NAME",
    "JOB_SCHEMA",
    "LATENT_SUFFIX",
    "LISTINGS_DIR",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PARQUET_META_COLUMNS",
    "PARTS_DIR",
    "PATH_COLUMNS",
    "RECORD_SUFFIX",
    "REPLACES",
    "SHARDS_DIR",
    "SHARD_CLIPS",
    "SHARD_MB",
    "SHARD_SUFFIX",
    "SOURCE_CHANGED",
    "SPOOL_PREFIX",
    "STATE_DIR",
    "TABLE_SUFFIXES",
    "VERSIONS_DIR",
    "ClipEncoder",
    "ClipOptions",
    "Columns",
    "Copies",
    "DatasetError",
    "Encoded",
    "EncoderSpec",
    "Engine",
    "Format",
    "Job",
    "JobConfig",
    "Listing",
    "LocalEncoder",
    "ModelIdentity",
    "PartWriter",
    "Plan",
    "Progress",
    "ServiceEncoder",
    "Source",
    "State",
    "Summary",
    "add_arguments",
    "check_unique",
    "clip_key",
    "collect",
    "differences",
    "encode_clip",
    "encode_dataset",
    "error_record",
    "fetch_clip",
    "job_from_args",
    "jsonl",
    "load_state",
    "main",
    "ok_record",
    "open_output",
    "output_locks",
    "parquet_schema",
    "plan",
    "publish_manifest",
    "publish_share",
    "read_job",
    "read_sidecars",
    "remove_orphans",
    "run_job",
    "suffix_of",
    "under",
    "with_row_options",
    "worker_of",
    "write_manifest",
]
