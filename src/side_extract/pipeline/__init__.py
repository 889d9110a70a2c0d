"""The audit as a chain of stages over a run directory (``side run`` and ``side demo``).

synthetic -> features -> surrogate -> classifier            -> extraction/side         -> evaluation/<m>
   |                     (clusters)   (noise-aware)
   +-> memorization (only with surrogate.memorized_fraction < 1: which samples are clustered)
train set -> classifier-clean -> teacher labels -> classifier-teacher -> extraction/side-teacher
             (time-independent)  ----------------------------------> extraction/cond
target ---------------------------------------------------------------> extraction/uncond

Each stage's fingerprint hashes its config and the fingerprints of the stages it reads, so a changed
setting reruns exactly the stages downstream of it. Stages read their inputs back from the run directory's
files, never from another stage's memory.

The package, one module per part of the chain (each imports only those above it):

- :mod:`.context`: what the stages of one run share (:class:`AuditContext`), the chain's types, the recorded paths;
- :mod:`.labelling`: the synthetic set's features, memorization scores and surrogate labels;
- :mod:`.methods`: what each method samples with (the classifiers, side-lora, the teacher labels, its guidance) and
  the extraction's fingerprint;
- :mod:`.evaluations`: the calibration, sample quality, the copy guard and every evaluation;
- :mod:`.preflight`: everything a run is refused for before its first stage;
- :mod:`.chain`: :func:`run_audit`, the stages in order.
"""
from .chain import load_run_target, refuse_data_stages, run_audit, warn_out_of_date, write_extraction_summary
from .context import (RECORDED_PATHS, UNTIL, AuditContext, AuditResult, ProgressFactory, Until, absolute_config,
                      absolute_paths, absolute_spec, config_extractor_fingerprints, extractor_fingerprints,
                      no_progress, script_fingerprints)
from .evaluations import (CALIBRATION_IGNORES, QUALITY_KEYS, calibration_settings, copy_guard, evaluate_method,
                          measured, quality_of, real_heldout)
from .labelling import features_stage, memorization_stage, surrogate_settings, surrogate_stage
from .methods import (GUIDED_METHODS, GUIDING_CLASSIFIER, classifier_fingerprint, classifier_settings, classifier_stage,
                      extraction_fingerprint, extraction_inputs, extraction_settings, extraction_upstream,
                      lora_stage, method_guidance, teacher_stage)
from .preflight import cluster_problems, preflight

__all__ = [
    "load_run_target", "refuse_data_stages", "run_audit", "warn_out_of_date", "write_extraction_summary",
    "RECORDED_PATHS", "UNTIL", "AuditContext", "AuditResult", "ProgressFactory", "Until", "absolute_config",
    "absolute_paths", "absolute_spec", "config_extractor_fingerprints", "extractor_fingerprints", "no_progress",
    "script_fingerprints", "CALIBRATION_IGNORES", "QUALITY_KEYS", "calibration_settings", "copy_guard",
    "evaluate_method", "measured", "quality_of", "real_heldout", "features_stage", "memorization_stage",
    "surrogate_settings", "surrogate_stage", "GUIDED_METHODS", "GUIDING_CLASSIFIER", "classifier_fingerprint",
    "classifier_settings", "classifier_stage",
    "extraction_fingerprint", "extraction_inputs", "extraction_settings", "extraction_upstream", "lora_stage",
    "method_guidance", "teacher_stage", "cluster_problems", "preflight",
]
