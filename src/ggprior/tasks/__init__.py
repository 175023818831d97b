"""The studies' harness: offline datasets and tokenizers (:mod:`.data`, :mod:`.tokenizer`), small
models (:mod:`.models`), and activation/gradient statistics of a model on a task (:mod:`.statistics`).
Not the library's core: imports ``io``, ``init`` and (``statistics`` only) ``stats``."""

from .data import (
    CORPORA,
    LABEL_NAMES,
    SPLITS,
    TASKS,
    DataError,
    TaskData,
    batches,
    corpus_split,
    load_task,
    task_info,
    task_kind,
)
from .models import (
    ARCHITECTURES,
    INIT_SCHEMES,
    ModelError,
    build_model,
    count_parameters,
    initialize_,
    load_minilm,
    model_for_task,
)
from .tokenizer import TextTokenizer, get_tokenizer
