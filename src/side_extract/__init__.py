"""side-extract: audit diffusion models for memorized training data.

Implements SIDE (Surrogate condItional Data Extraction; Chen, Ma, Zou, Jiang, arXiv 2410.02467), its
baselines (Carlini UnCond / Cond), the memorization metrics (AMS/UMS, 95th percentile, Carlini's and Gu's
ratios) and the paper's theory. The stages are modules (``sampling``, ``features``, ``memorization``, ``surrogate``,
``training``, ``extraction``, ``evaluation``, ``report``) chained over a run directory by ``pipeline``;
the ``side`` command line lives in ``side_extract.cli``.
"""
from importlib import metadata

try:
    __version__ = metadata.version("side-extract")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"


# The public API, imported on first use (``import side_extract`` stays light: torch loads with the first name).
_EXPORTS = {
    "audit": "api", "Audit": "api", "MethodResult": "api", "BandResult": "api", "ExtractedPair": "api",
    "Verification": "api", "as_target": "api", "Finding": "findings", "Findings": "findings",
    "RunConfig": "config", "SampleConfig": "config", "FeaturesConfig": "config", "SurrogateConfig": "config",
    "ClassifierConfig": "config", "ExtractConfig": "config", "EvaluateConfig": "config", "TrainTargetConfig": "config",
    "ImageSet": "data", "load_image_set": "data",
    "Target": "models.target", "load_target": "models.target", "train_target": "models.target",
    "sample": "sampling",
    "extract_features": "features",
    "ClusterLabeler": "surrogate", "TeacherLabeler": "surrogate", "SurrogateLabels": "surrogate",
    "label_candidates": "surrogate",
    "denoising_error": "memorization", "memorization_candidates": "memorization",
    "MemorizationGuidance": "memorization",
    "fit_label_classifier": "training", "train_classifier": "training", "ClassifierTrainResult": "training",
    "ClassifierGuidance": "guidance",
    "extract": "extraction", "draw_targets": "extraction",
    "evaluate": "evaluation", "calibrate": "evaluation", "Evaluation": "evaluation", "Calibration": "evaluation",
    "run_audit": "pipeline", "method_guidance": "pipeline",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'side_extract' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
