# src/anomaly_detection/models/__init__.py
from anomaly_detection.models.efficientad import EfficientADTrainer
from anomaly_detection.models.fastflow import FastFlowTrainer
from anomaly_detection.models.padim import PaDiMTrainer
from anomaly_detection.models.patchcore import PatchCoreTrainer
from anomaly_detection.models.reverse_distillation import ReverseDistillationTrainer
from anomaly_detection.models.stfpm import STFPMTrainer

# name -> trainer class. A trainer class builds its model from a config (build_model) and itself
# (from_config): everything the runner needs, declared by BaseTrainer. Adding a model is one line here.
MODELS = {
    "stfpm": STFPMTrainer,
    "patchcore": PatchCoreTrainer,
    "padim": PaDiMTrainer,
    "reverse_distillation": ReverseDistillationTrainer,
    "fastflow": FastFlowTrainer,
    "efficientad": EfficientADTrainer,
}


def get_trainer_class(name):
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}': expected one of {', '.join(MODELS)}")
    return MODELS[name]


# sub-command -> module with HELP, add_arguments(parser) and run(args): commands a model folder brings to the CLI
MODEL_COMMANDS = {
    "distill-teacher": "anomaly_detection.models.efficientad.distill",
}
