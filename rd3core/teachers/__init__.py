"""Teachers: what one is (trained here, or loaded from weights made elsewhere)
and how loaded weights become the study's teacher (checkpoint layouts,
torchvision's and timm's caches, input normalisation and class order).
May import torch, torchvision, timm and rd3core's lower modules (data, models,
loop, protocol, config, registry, artifacts); never rd3core.pipeline."""
from .checkpoints import LAYOUTS, CheckpointError, list_layouts
from .load import TeacherInput, TeacherRefused, load_pretrained, network_of, source_problems, teacher_model
from .spec import InputNorm, TeacherSpec

__all__ = ["LAYOUTS", "CheckpointError", "InputNorm", "TeacherInput", "TeacherRefused", "TeacherSpec",
           "list_layouts", "load_pretrained", "network_of", "source_problems", "teacher_model"]
