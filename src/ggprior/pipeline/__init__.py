"""The main job: the whole framework end to end on one task (:mod:`.run`) and its report (:mod:`.report`)."""

from .run import CODERS, FORMATS, VARIANTS, PipelineConfig, PipelineError, run_pipeline
