"""The run directory: resolved config, manifest, atomic writes, skip and resume.

Layout (see DESIGN.md)::

    run/
      config.yaml      resolved config, every default written out
      manifest.json    per stage: status, fingerprint of its inputs + config, the stages it was made from
                       (``inputs``: stage -> fingerprint; what stale_stages reads), versions, timings
      synthetic/ features/ surrogate/ classifier/ extraction/<method>/ evaluation/<method>/ report/

Every file is written to a temporary name in the same directory and renamed into place, so a crash never
leaves a half-written file. A stage whose fingerprint (its config plus its inputs' fingerprints) matches a
``complete`` entry is skipped; a stage that was interrupted resumes from what it wrote completely; a stage
whose fingerprint changed is cleared and redone.

The package, one module per concern (each imports only those above it):

- :mod:`.files`: atomic writes, safe reads (JSON, npz, torch state without unpickling, checkpoints), leftovers;
- :mod:`.fingerprints`: fingerprints of a stage's inputs and the versions recorded;
- :mod:`.contents`: what a run holds, read without writing (stages, methods, config, model, stale stages);
- :mod:`.lock`: one writer per run directory, and where a path lies in or outside a run;
- :mod:`.directory`: :class:`RunDir`, the manifest's writer (begin, complete, skip a stage);
- :mod:`.shards`: sharded stage output, resumed and split between the processes of a launch.
"""
from .contents import (MANIFEST, MODEL_INPUT, SYNTHETIC_EVALUATION, check_run_directory, evaluated_methods,
                       evaluated_synthetic, generated_source, other_target_evaluations, read_manifest, read_model,
                       read_model_entry, read_run_config, read_stages, reference_method, remade_inputs, run_input,
                       settings_changed, stale_stages)
from .directory import RunDir
from .files import (LEFTOVER_AGE_S, Checkpoint, atomic_directory, atomic_save_npz, atomic_write_bytes, atomic_write_json,
                    atomic_write_text, leftover_of, load_torch_state, missing_folders, npz_arrays, read_checkpoint,
                    read_json, read_npz, remove_empty_folders, shard_opens, shards_hold, sweep_leftovers,
                    whole_safetensors)
from .fingerprints import (FILE_KEYS, STAGE_VERSIONS, array_fingerprint, file_fingerprint, fingerprint_of,
                           settings_fingerprint, stage_fingerprint, versions)
from .lock import (PROBE_PATIENCE_S, RUN_FILES, RUN_FOLDERS, STAGE_SECTIONS, RunLocked, StageWouldBeReplaced,
                   check_outside_run_folders, check_run_path, check_unlocked, check_writable, enclosing_run, run_lock,
                   run_locked, stage_holding, stage_now)
from .shards import Progress, grows_from, shard_path, shard_ranges, shard_stage, write_shards

__all__ = [
    "MANIFEST", "MODEL_INPUT", "SYNTHETIC_EVALUATION", "check_run_directory", "evaluated_methods",
    "evaluated_synthetic", "generated_source", "other_target_evaluations", "read_manifest", "read_model",
    "read_model_entry", "read_run_config", "read_stages", "reference_method", "remade_inputs", "run_input",
    "settings_changed", "stale_stages", "RunDir", "LEFTOVER_AGE_S", "Checkpoint", "atomic_directory", "atomic_save_npz",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "leftover_of", "load_torch_state", "npz_arrays",
    "read_checkpoint", "read_json", "read_npz", "missing_folders", "remove_empty_folders", "shard_opens", "shards_hold",
    "sweep_leftovers", "whole_safetensors",
    "FILE_KEYS", "STAGE_VERSIONS", "array_fingerprint", "file_fingerprint", "fingerprint_of", "settings_fingerprint",
    "stage_fingerprint", "versions", "PROBE_PATIENCE_S", "RUN_FILES", "RUN_FOLDERS", "STAGE_SECTIONS", "RunLocked",
    "StageWouldBeReplaced", "check_outside_run_folders", "check_run_path", "check_unlocked", "check_writable",
    "run_locked", "enclosing_run", "run_lock", "stage_holding", "stage_now", "Progress", "grows_from", "shard_path",
    "shard_ranges",
    "shard_stage", "write_shards",
]
