"""Input and output: model sources read lazily (:mod:`.sources`), atomic writes (:mod:`.atomic`),
safetensors helpers (:mod:`.tensors`) and result tables (:mod:`.tables`). Imports nothing else of ggprior."""

from .atomic import atomic_dir, atomic_path, write_bytes, write_text
from .sources import (
    BUILTIN_MODELS,
    DictSource,
    SafetensorsSource,
    SourceError,
    TensorSource,
    builtin_model_dir,
    floating_names,
    open_source,
    side_files,
)
from .tables import to_csv, to_markdown, write_table
from .tensors import (
    SafetensorsWriter,
    dedupe,
    floating_values,
    parse_size,
    plan_shards,
    save_tensors,
    shared_names,
    storage_ptr,
)
