"""The main job: the whole framework end to end on one task (:mod:`.run`, stages in :mod:`.stages`), settings
(:mod:`.config`) and its report (:mod:`.report`, tables in :mod:`.summary`)."""

from .config import CODERS, FORMATS, MODELS, VARIANTS, PipelineConfig, PipelineError
from .run import run_pipeline
