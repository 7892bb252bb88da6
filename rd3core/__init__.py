"""rd3core: the pure kernels of decoupled dataset distillation (data, models,
augmentation, labels, losses, the training loop, synthesis methods, the
artifact store). No database, no Ray, no CLI: import it anywhere."""
from .config import ConfigError, build, stable_hash, to_dict
from .data import Dataset, DatasetInfo, Split, carve_heldout, list_datasets, load_dataset
from .loop import Runtime, train
from .models import create_model, list_models
from .pipeline import TeacherSpec, make_stored_labels, posteval, train_teacher
from .protocol import Protocol, list_presets, resolve_protocol
from .stored_labels import StoredLabels, StoredLabelsMismatch
from .synth import DistilledSet, list_methods, synthesize

__all__ = [
    "ConfigError", "build", "stable_hash", "to_dict", "Dataset", "DatasetInfo", "Split", "carve_heldout",
    "list_datasets", "load_dataset", "Runtime", "train", "create_model", "list_models", "TeacherSpec", "posteval",
    "train_teacher", "Protocol", "list_presets", "resolve_protocol", "DistilledSet", "list_methods", "synthesize",
    "make_stored_labels", "StoredLabels", "StoredLabelsMismatch",
]
