"""InsightFace RecordIO (``.rec``, ``.idx``, ``property``), read and written in pure Python.

One module per job; every name is importable from ``qualiface.data.recordio`` as before:

- ``format``: dmlc record framing (split records at aligned magic words) and mxnet's image-record
  header (``pack_record`` / ``unpack_record``), ``RecordIOError``.
- ``index``: the ``.idx`` file (``key<TAB>byte offset``): parsed and validated, or rebuilt from a
  scan of the ``.rec``.
- ``layout``: the files around a ``.rec``: path resolution, ``property``
  (``num_classes,height,width``) and ``identities.txt`` (``label<TAB>name``).
- ``dataset``: ``RecordIODataset``, registered as ``recordio`` (and ``rec``).
- ``writer``: ``RecordIOWriter``, which renames its temporary files into place only on success.

Every format problem raises ``RecordIOError`` naming the file and the byte offset.
"""

from __future__ import annotations

from qualiface.data.recordio.dataset import MAX_CLASSES_WITHOUT_IMAGES, RecordIODataset
from qualiface.data.recordio.format import (
    FLOAT32_EXACT,
    FRAME_HEADER_SIZE,
    MAGIC,
    MAX_RECORD_LENGTH,
    IRHeader,
    RecordIOError,
    frame_record,
    iter_records,
    map_file,
    pack_record,
    read_frame,
    unpack_record,
)
from qualiface.data.recordio.index import read_index, rebuild_index
from qualiface.data.recordio.layout import (
    IDENTITIES_FILE,
    PROPERTY_FILE,
    identity_name_problem,
    read_identity_names,
    read_property,
    resolve_paths,
)
from qualiface.data.recordio.writer import RecordIOWriter

__all__ = [
    "FLOAT32_EXACT", "FRAME_HEADER_SIZE", "IDENTITIES_FILE", "MAGIC", "MAX_CLASSES_WITHOUT_IMAGES",
    "MAX_RECORD_LENGTH", "PROPERTY_FILE", "IRHeader", "RecordIODataset", "RecordIOError",
    "RecordIOWriter", "frame_record", "identity_name_problem", "iter_records", "map_file",
    "pack_record", "read_frame", "read_identity_names", "read_index", "read_property",
    "rebuild_index", "resolve_paths", "unpack_record",
]
