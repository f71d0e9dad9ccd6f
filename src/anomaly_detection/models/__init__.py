# src/anomaly_detection/models/__init__.py
from anomaly_detection.models.padim import PaDiMTrainer
from anomaly_detection.models.patchcore import PatchCoreTrainer
from anomaly_detection.models.stfpm import STFPMTrainer

# name -> trainer class; each trainer class knows how to build its model from a config
MODELS = {
    "stfpm": STFPMTrainer,
    "patchcore": PatchCoreTrainer,
    "padim": PaDiMTrainer,
}


def get_trainer_class(name):
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}': expected one of {', '.join(MODELS)}")
    return MODELS[name]
